"""Prompt text of a Video-R1 record: question, options, reasoning instruction, per-type answer suffix.

Two templates:
- "think": reason inside <think> </think>, then answer inside <answer> </answer> (GRPO / RAL);
- "answer_only": answer inside <answer> </answer> with no reasoning (RAL-zero).
The SFT target follows the template: `process` + `solution` for "think", `solution` for "answer_only".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_ral.data.records import Record

THINK_INSTRUCTION = (
    "Think the question through step by step before you answer. Write your reasoning inside "
    "<think> </think> tags, then give your final answer inside <answer> </answer> tags."
)
ANSWER_ONLY_INSTRUCTION = "Do not explain. Give your final answer directly inside <answer> </answer> tags."

TYPE_SUFFIX = {
    "multiple choice": " Inside <answer> </answer>, write only the letter of the correct option (A, B, C, ...).",
    "numerical": " Inside <answer> </answer>, write only the number (for example 7 or 2.5).",
    "OCR": " Inside <answer> </answer>, write only the text you read in the image or video.",
    "free-form": " Inside <answer> </answer>, write only your answer.",
    "regression": " Inside <answer> </answer>, write only the number (for example 7 or 2.5).",
}


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    instruction: str
    type_suffix: dict = field(default_factory=lambda: dict(TYPE_SUFFIX))
    options_header: str = "Options:"


TEMPLATES = {
    "think": PromptTemplate("think", THINK_INSTRUCTION),
    "answer_only": PromptTemplate("answer_only", ANSWER_ONLY_INSTRUCTION),
}


def get_template(name: str) -> PromptTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def question_text(record: Record, template: PromptTemplate) -> str:
    """The user text: problem, then for multiple choice 'Options:' and one option per line, then the
    instruction and the per-type suffix."""
    text = record.problem.strip()
    if record.problem_type == "multiple choice" and record.options:
        text += "\n" + template.options_header + "\n" + "\n".join(o.strip() for o in record.options)
    return text + "\n" + template.instruction + template.type_suffix[record.problem_type]


def user_messages(record: Record, template: PromptTemplate, system_prompt: str | None = None) -> list[dict]:
    """Chat messages of one user turn with the media first and the question after it."""
    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    messages.append(
        {"role": "user", "content": [{"type": record.data_type}, {"type": "text", "text": question_text(record, template)}]}
    )
    return messages


def sft_target(record: Record, template: PromptTemplate) -> str:
    """Assistant text an SFT sample is trained on."""
    if template.name == "think":
        if not record.process:
            raise ValueError(f"{record.source}: the think template needs a 'process' rationale for SFT")
        return record.process.strip() + "\n" + record.solution.strip()
    return record.solution.strip()
