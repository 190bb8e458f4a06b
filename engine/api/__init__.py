"""The user-facing library: the Python API (client.py), the event log reader (eventlog.py), the
`engine` command line (cli.py) and the demo (demo.py)."""
