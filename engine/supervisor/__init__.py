"""The supervisor behind `engine start` (process.py), its pure child state machine
(children.py), and what every child process shares (child.py: spec on stdin, signals, reporting)."""
