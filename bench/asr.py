"""The local server's ears on its own voice: word accuracy of pocketsphinx on espeak-ng speech,
free decoding against decoding with expected phrases (engine/server/voice.py). Prints JSON.

    python bench/asr.py [--voices marin,alloy,cedar,ash] [--json]     (or: python bench/run.py asr)

Three sets, each spoken by every voice at 24 kHz PCM (the engine's mic path) and through G.711
µ-law at 8 kHz (the phone path):
- ``sentences``: the utterance is one of the expected phrases (a scenario's ``expect:``);
- ``tool_named``: a question that names a function tool, whose name is the only expected phrase
  of its own (plus the other phrases of the set);
- ``unexpected``: none of the expected phrases is said (the phrases must not make things worse).
Definitions: bench/README.md, "asr".
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SENTENCES = ["Where is the collection point?", "What is the capital of France?", "When can I pick up the car?",
             "Hello there", "I would like to book a table for two", "Can you hear me?",
             "What's the weather like today?", "Thank you, goodbye", "Tell me a long story please"]
TOOL_NAMED = {"Where exactly is the collection point?": "collection_point",
              "Can you check the weather forecast for me?": "weather_forecast",
              "Please book a table for tonight": "book_table"}
UNEXPECTED = ["The train leaves at nine", "Please call my brother", "I am hungry", "What time is it in Paris?",
              "Open the window"]


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(word edits, reference words): Levenshtein distance over the phrases' words."""
    from engine.server.expect import words_of
    r, h = words_of(ref), words_of(hyp)
    row = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, row[0] = row[0], i
        for j in range(1, len(h) + 1):
            cur = min(row[j] + 1, row[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
            prev, row[j] = row[j], cur
    return row[len(h)], len(r)


def run(voices: list[str]) -> dict[str, Any]:
    from engine.codec import decode_audio, encode_audio
    from engine.server.expect import expected_phrases
    from engine.server.voice import Recognizer, synthesize
    tools = [{"type": "function", "name": n} for n in TOOL_NAMED.values()]
    phrases = expected_phrases(SENTENCES, tools, "", [])
    sets = {"sentences": SENTENCES, "tool_named": list(TOOL_NAMED), "unexpected": UNEXPECTED}
    out: dict[str, Any] = {"voices": voices, "expected_phrases": len(phrases)}
    for path, fmt in (("pcm24k", "audio/pcm"), ("ulaw8k", "audio/pcmu")):
        for name, texts in sets.items():
            errs = {"free": [0, 0], "expected": [0, 0]}
            hits = {"free": 0, "expected": 0}
            hows: dict[str, int] = {}
            secs = {"free": 0.0, "expected": 0.0}
            for voice in voices:
                for text in texts:
                    pcm = decode_audio(encode_audio(synthesize(text, voice), fmt), fmt)
                    for kind, ph in (("free", ()), ("expected", phrases)):
                        t0 = time.perf_counter()
                        heard = Recognizer.recognize(pcm, ph)
                        secs[kind] += time.perf_counter() - t0
                        e, n = word_errors(text, heard.text)
                        errs[kind][0] += e
                        errs[kind][1] += n
                        if kind == "expected":
                            hows[heard.how] = hows.get(heard.how, 0) + 1
                        if text in TOOL_NAMED:
                            tool_words = " ".join(TOOL_NAMED[text].split("_"))
                            hits[kind] += f" {tool_words} " in f" {heard.text} "
            n_utt = len(voices) * len(texts)
            key = f"{path}_{name}"
            for kind in ("free", "expected"):
                out[f"{key}_word_accuracy_{kind}"] = round(1 - errs[kind][0] / errs[kind][1], 3)
                out[f"{key}_decode_ms_mean_{kind}"] = round(1000 * secs[kind] / n_utt)
                if name == "tool_named":
                    out[f"{key}_tool_name_heard_{kind}"] = f"{hits[kind]}/{n_utt}"
            out[f"{key}_decided_by"] = hows
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voices", default="marin,alloy,cedar,ash")
    ap.add_argument("--json", action="store_true", help="(always JSON; kept for bench/run.py's interface)")
    args = ap.parse_args()
    print(json.dumps(run(args.voices.split(",")), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
