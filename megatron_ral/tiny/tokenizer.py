"""A small byte-level BPE tokenizer with the Qwen2.5-VL special tokens and chat template.

The pipeline matches Qwen2's (NFC normaliser, the Qwen2 split regex, byte-level BPE, byte-level
decoder); only the vocabulary is small, trained with `tokenizers` on a built-in English corpus.
Special tokens follow the base vocabulary in the same order as in the released vocabulary.
"""

from __future__ import annotations

from functools import lru_cache

# Released Qwen2.5-VL added tokens, in id order (151643..151664 in the real vocabulary).
SPECIAL_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]

# The Qwen2-VL chat template (renders each image/video as <|vision_start|><|image_pad|><|vision_end|>).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BASE_VOCAB_SIZE = 1000

_CORPUS = """\
You are a helpful assistant. Watch the video carefully and answer the question.
What is the person in the video doing? Options: A. cooking B. running C. reading D. swimming
Please think about this question as if you were a human pondering deeply.
Engage in an internal dialogue using expressions such as let me think, wait, hmm, oh I see, let's break it down.
Provide your detailed reasoning between the <think> and </think> tags, and then give your final answer between the <answer> and </answer> tags.
Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.
Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.
Please transcribe text from the image/video clearly and provide your text answer within the <answer> </answer> tags.
Please provide your text answer within the <answer> </answer> tags.
How many red balls are on the table at the end of the clip? The answer is 3.
A man walks into the kitchen, opens the fridge, takes out a bottle of milk and pours a glass.
A woman rides a bicycle along the river while a dog runs beside her in the morning light.
Two children play with a ball in the park; one of them kicks it over the fence.
The camera pans from left to right across a busy street with cars, buses and people.
First, the cat jumps onto the chair. Then it sits on the table and looks out of the window.
In the first frame the door is closed, and in the last frame it is open.
The chart shows the number of visitors per month: January 120, February 135, March 160.
What color is the car that turns left at the crossing? It is blue.
Which object appears first in the video: the cup, the book, or the phone?
The speaker points at the screen and explains how the machine works step by step.
Count the number of people who enter the room after the music starts.
The weather is sunny, the sky is clear and the sea is calm near the harbour.
Let me think. The video starts with a close view of hands, then the view widens to show a workshop.
Wait, the question asks about the order of events, so I should compare the timestamps.
Hmm, the second clip is shorter than the first, which means the action happened faster.
Oh, I see. The answer must be B because the person is clearly holding a racket.
Let's break it down: there are four options and only one of them matches what we saw.
Describe the image in one sentence. A small house stands beside a tall tree under a grey sky.
Read the text on the sign: OPEN DAILY 9 AM TO 5 PM.
The temperature rose from 12 degrees to 18 degrees between 10:00 and 14:00.
Is the ball moving towards the camera or away from it? It is moving away.
Where does the scene take place? In a library with long wooden tables and high shelves.
The player throws the ball, the goalkeeper jumps, and the crowd cheers loudly.
After mixing the flour and the eggs, the cook puts the dough in the oven for twenty minutes.
The bird lands on the branch, sings for a while, and then flies away to the north.
What happens right after the glass falls? The water spreads over the floor.
How long does the whole video last? About two minutes and thirty seconds.
The model answers: <think>The person holds a pan over a stove, so they are cooking.</think><answer>A</answer>
The model answers: <think>I count one, two, three balls.</think><answer>3</answer>
Question: what is shown at the beginning? Answer: a map of the city with three marked routes.
This is a simple sentence. This is another simple sentence with numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000.
system user assistant image video picture frame second minute hour left right up down before after
"""


def _corpus_lines() -> list[str]:
    return [line for line in _CORPUS.splitlines() if line.strip()] * 4


def _train_core():
    """Train the byte-level BPE model; returns (vocab dict, merges list)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                        byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BASE_VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    model = json_model(tok)
    return model["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


def json_model(tok) -> dict:
    import json

    return json.loads(tok.to_str())["model"]


@lru_cache(maxsize=1)
def _trained() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    vocab, merges = _train_core()
    return tuple(sorted(vocab.items(), key=lambda kv: kv[1])), tuple(merges)


def build_tokenizer():
    """A `Qwen2Tokenizer` (transformers) over the trained vocabulary plus the Qwen2.5-VL added tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab_items, merges = _trained()
    vocab = dict(vocab_items)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=list(merges),
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
        errors="replace",
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.add_tokens([AddedToken(text, special=special, normalized=False) for text, special in SPECIAL_TOKENS])
    tokenizer.eos_token = "<|im_end|>"  # the Instruct checkpoints end a turn with <|im_end|>
    return tokenizer


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of every Qwen2.5-VL added token in `tokenizer`."""
    ids = {text: tokenizer.convert_tokens_to_ids(text) for text, _ in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise RuntimeError(f"tokenizer lacks special tokens {missing}")
    return ids
