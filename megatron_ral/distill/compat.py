"""Can this teacher score this student's trajectories? Checked once at start-up, from the files alone.

The teacher reads the student's token ids and vision inputs as they are, so every position must mean the
same thing to both models (paper §3.5: "the two models share tokenizer and vision patching, so positions
align one to one"). :func:`check_teacher_compatible` compares two Hugging Face directories (config.json,
generation_config.json, tokenizer and chat-template files) in this order and refuses, with one line naming
the teacher and the first difference:

    vocabulary size          text vocab_size (the rows of the embedding and of the logits)
    tokenizer                the vocabulary (token -> id), the BPE merges, the added tokens
    special-token ids        image / video pad, vision start / end, <|im_start|>, <|im_end|>, eos
    chat template            the prompt format the teacher was trained on
    vision patching          patch size, temporal patch size, spatial merge size, tokens_per_second

Nothing here imports torch; it reads JSON and text files only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megatron_ral.config.errors import ConfigError

TOKEN_ID_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
# vision_config key -> released aliases (older config.json files use spatial_patch_size)
VISION_KEYS = {"patch_size": ("patch_size", "spatial_patch_size"), "temporal_patch_size": ("temporal_patch_size",),
               "spatial_merge_size": ("spatial_merge_size",), "tokens_per_second": ("tokens_per_second",)}


class TeacherMismatch(ConfigError):
    """The teacher's files differ from the student's in something that aligns positions."""


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _text_value(config: dict, key: str) -> Any:
    """A text-model key of config.json: in ``text_config`` (transformers 5) or at the top (released layout)."""
    text = config.get("text_config") or {}
    return text.get(key, config.get(key))


def _vision_value(config: dict, key: str) -> Any:
    vision = config.get("vision_config") or {}
    for name in VISION_KEYS[key]:
        if name in vision:
            return vision[name]
    return None


def _eos_ids(hf_dir: Path, config: dict) -> list[int] | None:
    """eos ids as generation uses them: generation_config.json's, else config.json's (top or text)."""
    gen = _json(hf_dir / "generation_config.json") or {}
    eos = gen.get("eos_token_id")
    if eos is None:
        eos = config.get("eos_token_id", (config.get("text_config") or {}).get("eos_token_id"))
    if eos is None:
        return None
    return sorted({int(e) for e in (eos if isinstance(eos, list) else [eos])})


def tokenizer_table(hf_dir: str | os.PathLike) -> dict | None:
    """{"vocab": {token: id}, "merges": [...], "added": {token: id}} of a directory's tokenizer
    (tokenizer.json, else vocab.json + merges.txt + added_tokens.json); None when it has none."""
    d = Path(hf_dir)
    tok = _json(d / "tokenizer.json")
    if isinstance(tok, dict) and isinstance(tok.get("model"), dict):
        model = tok["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        added = {t["content"]: int(t["id"]) for t in tok.get("added_tokens") or [] if "content" in t}
        return {"vocab": dict(model.get("vocab") or {}), "merges": merges, "added": added}
    vocab = _json(d / "vocab.json")
    if not isinstance(vocab, dict):
        return None
    merges_file = d / "merges.txt"
    merges = [ln for ln in merges_file.read_text().splitlines() if ln and not ln.startswith("#version")] \
        if merges_file.is_file() else []
    return {"vocab": vocab, "merges": merges, "added": _json(d / "added_tokens.json") or {}}


def chat_template(hf_dir: str | os.PathLike) -> str | None:
    """The chat template a directory carries (chat_template.jinja, chat_template.json or
    tokenizer_config.json, in that order), stripped; None when it has none."""
    d = Path(hf_dir)
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text().strip()
    for name in ("chat_template.json", "tokenizer_config.json"):
        data = _json(d / name)
        template = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(template, str):
            return template.strip()
    return None


def _first_token_difference(a: dict, b: dict) -> str:
    for token in sorted(set(a) | set(b), key=lambda t: (min(a.get(t, 1 << 62), b.get(t, 1 << 62)), t)):
        if a.get(token) != b.get(token):
            return f"token {token!r} has id {b.get(token)} in the teacher, {a.get(token)} in the student"
    return "they differ"


def differences(student_dir: str | os.PathLike, teacher_dir: str | os.PathLike) -> list[str]:
    """Every difference that breaks the one-to-one alignment of positions, in the order of the module
    docstring (empty: compatible)."""
    s_dir, t_dir = Path(student_dir), Path(teacher_dir)
    s_cfg, t_cfg = _json(s_dir / "config.json") or {}, _json(t_dir / "config.json") or {}
    out: list[str] = []

    def compare(what: str, s: Any, t: Any) -> None:
        if s != t:
            out.append(f"{what} is {t} in the teacher, {s} in the student")

    compare("vocab_size", _text_value(s_cfg, "vocab_size"), _text_value(t_cfg, "vocab_size"))
    s_tok, t_tok = tokenizer_table(s_dir), tokenizer_table(t_dir)
    if (s_tok is None) != (t_tok is None):
        out.append("the tokenizer: " + ("the teacher has no tokenizer files" if t_tok is None
                                        else "the student has no tokenizer files"))
    elif s_tok is not None:
        if s_tok["vocab"] != t_tok["vocab"]:
            out.append(f"the tokenizer vocabulary: {_first_token_difference(s_tok['vocab'], t_tok['vocab'])}")
        elif s_tok["merges"] != t_tok["merges"]:
            out.append("the tokenizer's BPE merges differ")
        elif s_tok["added"] != t_tok["added"]:
            out.append(f"the tokenizer's added tokens: {_first_token_difference(s_tok['added'], t_tok['added'])}")
    for key in TOKEN_ID_KEYS:
        compare(key, s_cfg.get(key), t_cfg.get(key))
    for token in CHAT_TOKENS:
        s_id = None if s_tok is None else {**s_tok["vocab"], **s_tok["added"]}.get(token)
        t_id = None if t_tok is None else {**t_tok["vocab"], **t_tok["added"]}.get(token)
        compare(f"the id of {token}", s_id, t_id)
    compare("eos_token_id", _eos_ids(s_dir, s_cfg), _eos_ids(t_dir, t_cfg))
    s_chat, t_chat = chat_template(s_dir), chat_template(t_dir)
    if s_chat != t_chat:
        out.append("the chat template " + ("is missing in the teacher" if t_chat is None else
                                           "is missing in the student" if s_chat is None else "differs"))
    for key in VISION_KEYS:
        compare(f"vision_config.{key}", _vision_value(s_cfg, key), _vision_value(t_cfg, key))
    return out


def check_teacher_compatible(student_dir: str | os.PathLike, teacher_dir: str | os.PathLike,
                             teacher_key: str = "algorithm.teacher_hf_path") -> None:
    """Raise :class:`TeacherMismatch` (one line, naming ``teacher_key``, the teacher's directory and the
    first difference) unless the teacher can score the student's sequences position by position."""
    found = differences(student_dir, teacher_dir)
    if found:
        more = f" (and {len(found) - 1} more difference{'s' if len(found) > 2 else ''})" if len(found) > 1 else ""
        raise TeacherMismatch(teacher_key, f"the teacher {teacher_dir} cannot score the student's ({student_dir}) "
                                           f"sequences: {found[0]}{more}")
