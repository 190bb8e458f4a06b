"""What the local server expects to hear: the phrases its recogniser decodes user audio against.

Pure. :func:`expected_phrases` gathers them, at the moment a user audio turn is committed, from
(in this order, duplicates dropped, at most MAX_PHRASES):

1. the scenario: its ``expect:`` list, then each rule's ``hear`` and ``match.text``;
2. the session's function tools: each name as words (``collection_point`` -> "collection point");
3. the instructions: each phrase in double quotes ("..." or “...”);
4. the conversation: the clauses (split at punctuation) of the newest CONVERSATION_ITEMS text
   messages of the user and system roles (typed text, never the assistant's own replies, so a
   misheard "You said: ..." cannot make the mistake stick).

Tool descriptions are not used: they say what a tool does, not what people say, and a sentence
heard as a description would hide the tool's name from the rule that calls it.

A phrase is lowercase words of ``a-z`` and apostrophes; the recogniser (engine/server/voice.py)
drops words it has no pronunciation for. No phrases: free decoding, as before.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

MAX_PHRASES = 48
CONVERSATION_ITEMS = 6
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")
_CLAUSE = re.compile(r"[,.;:!?()\[\]\n]+")
_QUOTED = re.compile(r"[\"“]([^\"“”]{2,80})[\"”]")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def words_of(text: str) -> list[str]:
    """Lowercase words (letters and inner apostrophes); ``_``, ``-`` and camelCase split words."""
    return _WORD.findall(_CAMEL.sub(" ", text).replace("_", " ").replace("-", " ").lower())


def phrase(text: str) -> str:
    """``text`` as a phrase: its words joined by single spaces."""
    return " ".join(words_of(text))


def tool_phrase(name: str) -> str:
    """The words a user says to ask for a tool: its name (``collection_point`` -> "collection point")."""
    return phrase(name)


def clauses(text: str) -> list[str]:
    """``text`` split at punctuation into phrases."""
    return [p for p in (phrase(c) for c in _CLAUSE.split(text)) if p]


def expected_phrases(scenario_phrases: Iterable[str], tools: Iterable[dict[str, Any]], instructions: str,
                     conversation: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    """The phrases to expect, in the module's order; ``conversation`` is (role, text) of the
    conversation's text messages, oldest first."""
    out: list[str] = []
    seen: set[str] = set()

    def add(p: str) -> None:
        if p and p not in seen and len(out) < MAX_PHRASES:
            seen.add(p)
            out.append(p)

    for text in scenario_phrases:
        add(phrase(text))
    for tool in tools:
        if (tool.get("type") or "function") == "function" and isinstance(tool.get("name"), str):
            add(tool_phrase(tool["name"]))
    for quoted in _QUOTED.findall(instructions or ""):
        add(phrase(quoted))
    recent = [text for role, text in conversation if role in ("user", "system")][-CONVERSATION_ITEMS:]
    for text in reversed(recent):
        for c in clauses(text):
            add(c)
    return tuple(out)
