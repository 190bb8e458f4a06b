"""Scenario files script what the local server says and which faults it injects.

Format (YAML; documented in docs/local-server.md)::

    default_reply: "You said: {user}."     # {user}: what the server heard
    turns:                                  # first matching rule wins
      - match: {turn: 1}                    # the 1st user turn
        reply: "Hello!"
      - match: {text: "capital"}            # case-insensitive substring of the user's text
        reply: "The capital of France is Paris."
      - match: {regex: "collect(ion)? point"}
        call: {name: ask_client, arguments: {question: "Where is the collection point?"}}
        then: "Thanks. {output}"            # reply after the function output; {output}
      - match: {text: "transcribe"}
        hear: "override the transcript"    # what the server 'heard' for this turn
      - match: {text: "my name", context: "name is"}   # GPT-Live: context = placed thinking/instructions
        reply: "I know this: {context}"    # {context}: the newest placed context (GPT-Live only)
      - match: {text: "booking"}
        delegate: {ack: "Let me check."}   # GPT-Live: a client delegation (a `call` delegates too)
        then: "Here it is: {output}"       # said with the application's commentary ({output})
    expect: ["where is the collection point"]  # phrases the recogniser listens for (engine/server/expect.py)
    faults: {...}                           # same keys as engine.server.faults.Faults

A rule may also set ``hear`` for audio turns matched by ``turn``, so tests get exact
transcripts without relying on the rough recogniser. ``delegate`` and ``match.context`` are
read by the GPT-Live session only (:mod:`engine.server.live_session`); the Realtime session
ignores them.
"""
from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import read_yaml_file
from engine.server.errors import ServerError
from engine.server.faults import Faults


class ScenarioError(ServerError, ValueError):
    """A scenario file that cannot be used; the message names the key and the problem."""


DEFAULT_DELEGATION_ACK = "One moment, let me check."


class _Blank(dict[str, str]):
    """Template values: an unknown placeholder stays as written."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def fill(template: str, values: dict[str, str]) -> str:
    """``template`` with ``{user}``, ``{context}``, ``{output}``… filled in; a placeholder with no
    value stays as written (``str.format`` would raise KeyError)."""
    return string.Formatter().vformat(template, (), _Blank(values))


def speakable(output: str) -> str:
    """A tool's output as words to say: a JSON object's values, a JSON string's text, else as it is."""
    try:
        value = json.loads(output)
    except ValueError:
        return output
    if isinstance(value, dict):
        return ", ".join(str(v) for v in value.values() if not isinstance(v, (dict, list))) or output
    return value if isinstance(value, str) else output


@dataclass
class Rule:
    turn: int | None = None
    text: str | None = None
    regex: re.Pattern[str] | None = None
    reply: str | None = None
    call_name: str | None = None
    call_arguments: str = "{}"
    then: str | None = None
    hear: str | None = None
    context: str | None = None           #: GPT-Live: substring of the placed context (thinking, instructions)
    delegate: bool = False               #: GPT-Live: delegate to the client (a ``call`` does too)
    delegate_ack: str = DEFAULT_DELEGATION_ACK   #: GPT-Live: said while waiting; "" for nothing

    def matches(self, turn: int, user_text: str, context: str = "") -> bool:
        if self.turn is not None and self.turn != turn:
            return False
        if self.context is not None and self.context.lower() not in context.lower():
            return False
        if self.text is not None and self.text.lower() not in user_text.lower():
            return False
        if self.regex is not None and not self.regex.search(user_text):
            return False
        return True


@dataclass
class Scenario:
    rules: list[Rule] = field(default_factory=list)
    default_reply: str = "You said: {user}."
    faults: Faults = field(default_factory=Faults)
    expect: list[str] = field(default_factory=list)

    def phrases(self) -> list[str]:
        """What the scenario expects users to say: ``expect``, then each rule's ``hear`` and ``match.text``."""
        out = list(self.expect)
        for rule in self.rules:
            out += [t for t in (rule.hear, rule.text) if t]
        return out

    def rule_for(self, turn: int, user_text: str, context: str = "") -> Rule | None:
        for rule in self.rules:
            if rule.matches(turn, user_text, context):
                return rule
        return None

    def heard_for_turn(self, turn: int) -> str | None:
        for rule in self.rules:
            if rule.hear is not None and rule.turn == turn and rule.text is None and rule.regex is None:
                return rule.hear
        return None


_RULE_KEYS = {"match", "reply", "call", "then", "hear", "delegate"}
_MATCH_KEYS = {"turn", "text", "regex", "context"}


def parse_scenario(data: Any, source: str = "scenario") -> Scenario:
    if data is None:
        return Scenario()
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: expected a mapping at the top level")
    unknown = set(data) - {"turns", "default_reply", "faults", "expect"}
    if unknown:
        raise ScenarioError(f"{source}: unknown key {sorted(unknown)[0]!r} (allowed: turns, default_reply, expect, faults)")
    sc = Scenario()
    if "default_reply" in data:
        if not isinstance(data["default_reply"], str):
            raise ScenarioError(f"{source}: default_reply must be a string")
        sc.default_reply = data["default_reply"]
    expect = data.get("expect") or []
    if not isinstance(expect, list) or not all(isinstance(e, str) for e in expect):
        raise ScenarioError(f"{source}: expect must be a list of phrases (strings)")
    sc.expect = list(expect)
    turns = data.get("turns") or []
    if not isinstance(turns, list):
        raise ScenarioError(f"{source}: turns must be a list of rules")
    for i, raw in enumerate(turns):
        where = f"{source}: turns[{i}]"
        if not isinstance(raw, dict):
            raise ScenarioError(f"{where}: expected a mapping")
        bad = set(raw) - _RULE_KEYS
        if bad:
            raise ScenarioError(f"{where}: unknown key {sorted(bad)[0]!r} (allowed: {', '.join(sorted(_RULE_KEYS))})")
        match = raw.get("match") or {}
        if not isinstance(match, dict) or set(match) - _MATCH_KEYS:
            raise ScenarioError(f"{where}.match: expected a mapping with turn, text, regex or context")
        rule = Rule(turn=match.get("turn"), text=match.get("text"), reply=raw.get("reply"),
                    then=raw.get("then"), hear=raw.get("hear"), context=match.get("context"))
        if rule.context is not None and not isinstance(rule.context, str):
            raise ScenarioError(f"{where}.match.context must be a string")
        delegate = raw.get("delegate")
        if delegate is not None and delegate is not False:
            if delegate is not True and not (isinstance(delegate, dict) and set(delegate) <= {"ack"}
                                             and isinstance(delegate.get("ack", ""), str)):
                raise ScenarioError(f"{where}.delegate: expected true or {{ack: \"what the model says meanwhile\"}}")
            rule.delegate = True
            if isinstance(delegate, dict) and "ack" in delegate:
                rule.delegate_ack = delegate["ack"]
        if rule.turn is not None and not isinstance(rule.turn, int):
            raise ScenarioError(f"{where}.match.turn must be an integer")
        if "regex" in match:
            try:
                rule.regex = re.compile(match["regex"], re.IGNORECASE)
            except re.error as exc:
                raise ScenarioError(f"{where}.match.regex: {exc}") from None
        call = raw.get("call")
        if call is not None:
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise ScenarioError(f"{where}.call: expected {{name: ..., arguments: {{...}}}}")
            args = call.get("arguments", {})
            rule.call_name = call["name"]
            rule.call_arguments = args if isinstance(args, str) else json.dumps(args)
        if rule.reply is None and rule.call_name is None and rule.hear is None and not rule.delegate:
            raise ScenarioError(f"{where}: needs reply, call, delegate or hear")
        sc.rules.append(rule)
    if "faults" in data:
        try:
            sc.faults = Faults.from_dict(data["faults"])
        except ValueError as exc:
            raise ScenarioError(f"{source}: faults: {exc}") from None
    return sc


def load_scenario(path: str | Path | None) -> Scenario:
    if path is None:
        return Scenario()
    p = Path(path)
    return parse_scenario(read_yaml_file(p, "scenario", ScenarioError), str(p))
