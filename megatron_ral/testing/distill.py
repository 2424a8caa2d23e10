"""Distillation test helpers: the teacher runner beside the student at any TP x PP, against transformers.

:func:`teacher_pass_worker` (one rank of a ``run_distributed`` job) builds the student and, beside it, a
teacher of other shapes with ``distill.teacher.build_teacher`` (placements "device" and "host"), runs the
trainer's teacher pass (``rl.passes.teacher_pass``) over one micro-batch of an image and a video prompt with
responses, and returns the teacher's attention rows and vocab-parallel logits; :func:`check_teacher_pass`
compares them with transformers' eager teacher (last-layer head-mean rows, logits at the positions that
predict the response tokens), and the student's rows of the same micro-batch with the eager student.
"""

from __future__ import annotations

import torch

from megatron_ral.testing.attention import VISION_KEYS, hf_attention_rows, random_response, with_response


def teacher_pass_worker(tp: int, pp: int, student_mc: str, teacher_mc: str, student_hf: str, prompts: list,
                        responses: list[list[int]], run_dir: str, teacher_split: list[int] | None = None) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_ral.attention.capture import AttentionCapture
    from megatron_ral.attention.old_policy import OldPolicyConfig, make_old_policy_store
    from megatron_ral.config.schema import ParallelConfig
    from megatron_ral.distill.teacher import TeacherConfig, build_teacher
    from megatron_ral.inference.loading import load_model
    from megatron_ral.models.qwen25vl.provider import LMArchitecture, balanced_layer_split, load_hf_config
    from megatron_ral.platform import initialize
    from megatron_ral.rl.batch import SequenceRef, build_micro_batch
    from megatron_ral.rl.passes import teacher_pass
    from megatron_ral.rl.schedule import PassContext, run_pass
    from megatron_ral.rl.vision import encode_prompts_vision
    from megatron_ral.testing.models import TOKEN_IDS

    initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=3)
    layers = LMArchitecture.from_hf(load_hf_config(student_mc)).num_layers
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              pipeline_layer_split=balanced_layer_split(layers, pp))
    student = load_model(student_mc, parallel, dtype=torch.float32, backend="local")
    mb = build_micro_batch(0, 0, [SequenceRef(i, 0) for i in range(len(prompts))], prompts,
                           [[torch.tensor(r)] for r in responses], torch.zeros(len(prompts), 1),
                           [1.0] * len(prompts), TOKEN_IDS["<|endoftext|>"])
    tp_group = ps.get_tensor_model_parallel_group()
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    out = {"rank": torch.distributed.get_rank(), "last_stage": last, "tp_rank": ps.get_tensor_model_parallel_rank()}

    student_rows = {}

    def keep(_mb, _token_loss, result):
        student_rows["rows"] = result.rows
        return None, {}

    ctx = PassContext(model=[student], vision=encode_prompts_vision(student, prompts),
                      capture=AttentionCapture(student))
    run_pass(ctx, [mb], keep, forward_only=True, capture_kwargs=lambda _mb: {"grad": False})
    out["student_rows"] = student_rows.get("rows")

    for placement in ("device", "host"):
        teacher = build_teacher(TeacherConfig(load=teacher_mc, placement=placement, pipeline_layer_split=teacher_split),
                                parallel, student_hf, run_dir, dtype=torch.float32, backend="local")
        store = make_old_policy_store(OldPolicyConfig(mode="rows", dtype="fp32"), tp_group)
        logits: dict = {}
        before = teacher.device_bytes()
        with teacher.active():
            during = teacher.device_bytes()
            ctx = PassContext(model=teacher.chunks, vision=encode_prompts_vision(teacher.model, prompts),
                              capture=teacher.capture)
            teacher_pass(ctx, [mb], store, logits, lambda x: x)
        out[placement] = {
            "rows": store.get(0) if 0 in store else None, "logits": logits.get(0),
            "device_bytes": (before, during, teacher.device_bytes()), "nbytes": teacher.nbytes(),
            "requires_grad": any(p.requires_grad for p in teacher.model.parameters()),
            "training": teacher.model.training, "layers": len(teacher.model.language_model.decoder.layers),
        }
    return out


def check_teacher_pass(root, tp: int, pp: int = 1, teacher_split: list[int] | None = None, atol: float = 1e-5) -> list:
    """Run :func:`teacher_pass_worker` on ``tp * pp`` gloo ranks with the tiny student and the larger
    ``small`` teacher (more layers, 4x the width, twice the heads, tied embeddings) and assert the teacher's
    rows and logits against transformers' eager teacher, the student's rows against the eager student."""
    from megatron_ral.testing.inference import converted_checkpoint, load_hf_model, standard_prompts
    from megatron_ral.testing.spawn import run_distributed

    s_hf, s_mc = converted_checkpoint(root / "student", "tiny", seed=4)
    t_hf, t_mc = converted_checkpoint(root / "teacher", "small", seed=5)
    std = standard_prompts()
    prompts = [std["image"], std["video"]]
    responses = [random_response(5, seed=21), random_response(7, seed=22)]
    outs = run_distributed(teacher_pass_worker, tp * pp, tp, pp, str(s_mc), str(t_mc), str(s_hf), prompts,
                           responses, str(root / "run"), teacher_split, timeout=900)
    hf_teacher, hf_student = load_hf_model(t_hf), load_hf_model(s_hf)
    t_rows = [hf_attention_rows(hf_teacher, p, r) for p, r in zip(prompts, responses)]
    s_rows = [hf_attention_rows(hf_student, p, r) for p, r in zip(prompts, responses)]
    t_logits = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            seq = with_response(p, r)
            ids = seq.input_ids[None]
            cfg = hf_teacher.config
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                      "mm_token_type_ids": (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()}
            inputs.update({k: getattr(seq, k) for k in VISION_KEYS if getattr(seq, k) is not None})
            full = hf_teacher(**inputs).logits[0].double()
            t_logits.append(full[len(p) - 1: len(p) - 1 + len(r)])

    vocab = t_logits[0].shape[-1]
    for o in outs:
        for placement in ("device", "host"):
            got = o[placement]
            assert not got["requires_grad"] and not got["training"]
            before, during, after = got["device_bytes"]
            if placement == "host":
                assert before == after == 0 and during == got["nbytes"] > 0, got["device_bytes"]
            else:
                assert before == during == after == got["nbytes"] > 0
            if not o["last_stage"]:
                assert got["rows"] is None and got["logits"] is None
                continue
            for b, (ref_rows, ref_logits) in enumerate(zip(t_rows, t_logits)):
                n, length = ref_rows.shape
                rows = got["rows"][b, :n, :length].double()
                assert (rows - ref_rows).abs().max().item() <= atol, (o["rank"], placement, b)
                assert not got["rows"][b, n:].any()  # padding rows of the shorter response
                shard = vocab // tp
                lo = o["tp_rank"] * shard
                logits = got["logits"][b, :n].double()
                assert logits.shape[-1] == shard
                diff = (logits - ref_logits[:, lo: lo + shard]).abs().max().item()
                assert diff <= 1e-4 * max(1.0, ref_logits.abs().max().item()), (o["rank"], placement, b, diff)
        if o["last_stage"]:
            for b, ref in enumerate(s_rows):
                n, length = ref.shape
                assert (o["student_rows"][b, :n, :length].double() - ref).abs().max().item() <= atol
    return outs


__all__ = ["check_teacher_pass", "teacher_pass_worker", "random_response"]
