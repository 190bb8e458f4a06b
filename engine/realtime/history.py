"""The conversation as the API holds it, kept as client items to replay into a new API session. Pure.

Rules:
- Every item the API adds to the conversation (``conversation.item.added``, whoever caused it:
  our ``conversation.item.create``, the user's committed audio, the model's output) is an entry,
  in the API's order (after its ``previous_item_id``). Out-of-band responses add no item.
- An entry is kept as the client item that recreates it: messages as text (``input_text`` for
  user and system, ``output_text`` for the assistant), function calls and their outputs as they
  are. Audio is not kept, so an audio message is its transcript: the user's from input
  transcription, the model's from its audio transcript (after a barge-in, the part heard). A
  user turn with no transcript (transcription off, or it failed) is replayed as
  :data:`UNTRANSCRIBED`, so the model still sees that the user spoke there.
- An entry whose content is not known yet (the model's answer still streaming, a function call
  whose arguments are still coming) is not replayed; the answer it belongs to is reported failed.
- Items deleted in the API (``conversation.item.deleted``) go. The latest :data:`REPLAYED`
  replayable entries are replayed, each with its item id, so the new session's echo of it
  (``conversation.item.added`` with the same id) is known, not added twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

#: items replayed into a new API session (the latest ones)
REPLAYED = 50
#: entries kept at most (older ones go first)
KEPT = 4 * REPLAYED
#: the text of a user audio turn that has no transcript
UNTRANSCRIBED = "[the user spoke here; no transcript was made]"


@dataclass
class Entry:
    item_id: str
    item: dict[str, Any]        #: the client item, without its id
    complete: bool              #: its content is known: it can be replayed
    audio: bool = False         #: a user audio message (its text is the transcript, or UNTRANSCRIBED)


def _text_part(role: str, text: str) -> dict[str, Any]:
    return {"type": "output_text" if role == "assistant" else "input_text", "text": text}


def client_item(item: Mapping[str, Any]) -> tuple[dict[str, Any], bool, bool] | None:
    """A server item as the client item that recreates it, whether its content is known, and
    whether it is a user audio message; None for an item type the conversation does not replay."""
    kind = item.get("type")
    if kind == "message":
        role = str(item.get("role") or "user")
        texts: list[str] = []
        audio = complete = False
        for part in item.get("content") or []:
            if not isinstance(part, Mapping):
                continue
            ptype = part.get("type")
            if ptype in ("input_text", "output_text", "text"):
                texts.append(str(part.get("text") or ""))
                complete = True
            elif ptype in ("input_audio", "output_audio", "audio"):
                audio = audio or role == "user"
                if isinstance(part.get("transcript"), str) and (part["transcript"] or role != "assistant"):
                    texts.append(part["transcript"])
                    complete = True
        return {"type": "message", "role": role, "content": [_text_part(role, "".join(texts))]}, complete, audio
    if kind == "function_call":
        args = item.get("arguments")
        complete = isinstance(args, str) and item.get("status") != "in_progress"
        return ({"type": "function_call", "call_id": item.get("call_id"), "name": item.get("name"),
                 "arguments": args if isinstance(args, str) else ""}, complete, False)
    if kind == "function_call_output":
        return {"type": "function_call_output", "call_id": item.get("call_id"), "output": item.get("output")}, True, False
    return None


class History:
    """The conversation's entries in the API's order."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.by_id: dict[str, Entry] = {}
        self.version = 0            #: counts changes (added, done, text, deleted, restore)

    def __len__(self) -> int:
        return len(self.entries)

    def added(self, item: Mapping[str, Any], previous_item_id: str | None = None) -> bool:
        """``conversation.item.added``: a new entry after ``previous_item_id`` (at the end when it is
        unknown); an item already kept (a replayed one, echoed) only fills in what it lacked. True
        when the replayable conversation changed."""
        item_id = item.get("id")
        made = client_item(item)
        if not isinstance(item_id, str) or made is None:
            return False
        client, complete, audio = made
        old = self.by_id.get(item_id)
        if old is not None:
            if old.complete or not complete:
                return False
            old.item, old.complete = client, True
            self.version += 1
            return True
        entry = Entry(item_id, client, complete, audio)
        self.version += 1
        prev = self.by_id.get(previous_item_id) if previous_item_id else None
        self.entries.insert(self.entries.index(prev) + 1 if prev is not None else len(self.entries), entry)
        self.by_id[item_id] = entry
        if len(self.entries) > KEPT:
            for gone in self.entries[:len(self.entries) - KEPT]:
                del self.by_id[gone.item_id]
            del self.entries[:len(self.entries) - KEPT]
        return complete or audio

    def done(self, item: Mapping[str, Any]) -> bool:
        """``conversation.item.done``: the item as finished (a function call's arguments, a message's
        text); True when that changed the replayable conversation."""
        entry = self.by_id.get(str(item.get("id")))
        made = client_item(item)
        if entry is None or made is None or entry.complete or not made[1]:
            return False
        entry.item, entry.complete = made[0], True
        self.version += 1
        return True

    def text(self, item_id: str, text: str, *, final: bool = True) -> bool:
        """The text of a message entry is known (a transcript, an answer's text, the heard part after
        a barge-in: ``final`` replaces what was there). True when that changed the conversation."""
        entry = self.by_id.get(item_id)
        if entry is None or entry.item.get("type") != "message" or (entry.complete and not final):
            return False
        part = _text_part(str(entry.item.get("role")), text)
        if entry.complete and entry.item["content"] == [part]:
            return False
        entry.item = {**entry.item, "content": [part]}
        entry.complete = True
        self.version += 1
        return True

    def unanswered_call(self, call_id: str) -> bool:
        """The conversation holds a function call ``call_id`` and no output for it (a call made
        before a restart, which the new process knows only from here)."""
        calls = [e for e in self.entries if e.item.get("call_id") == call_id]
        return any(e.item.get("type") == "function_call" for e in calls) and \
            not any(e.item.get("type") == "function_call_output" for e in calls)

    def deleted(self, item_id: str) -> bool:
        entry = self.by_id.pop(item_id, None)
        if entry is None:
            return False
        self.entries.remove(entry)
        self.version += 1
        return True

    def replayable(self) -> list[dict[str, Any]]:
        """The latest :data:`REPLAYED` entries that can be replayed, as client items with their ids."""
        out: list[dict[str, Any]] = []
        for entry in reversed(self.entries):
            if len(out) == REPLAYED:
                break
            if entry.complete:
                if entry.item.get("type") == "message" and not entry.item["content"][0]["text"]:
                    continue   # nothing was said (an answer cut before a word was heard)
                out.append({"id": entry.item_id, **entry.item})
            elif entry.audio:
                out.append({"id": entry.item_id, **entry.item,
                            "content": [_text_part(str(entry.item.get("role")), UNTRANSCRIBED)]})
        out.reverse()
        return out

    def restore(self, items: list[Any]) -> None:
        """Take the entries a predecessor published (client items with ids, as :meth:`replayable` gives)."""
        self.entries, self.by_id = [], {}
        self.version += 1
        for raw in items[-KEPT:]:
            if not isinstance(raw, Mapping) or not isinstance(raw.get("id"), str):
                continue
            entry = Entry(raw["id"], {k: v for k, v in raw.items() if k != "id"}, True)
            self.entries.append(entry)
            self.by_id[entry.item_id] = entry
