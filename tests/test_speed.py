"""Speed options of the trainer (mmcat.train.speed, train.grad_checkpointing, train.compile, MFU): the choices each
device gets, and that the memory/speed options leave the numbers of a training step unchanged."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mmcat.config import TrainRunConfig, load_config


def _cfg(*overrides):
    return load_config(TrainRunConfig, None, ["data.root=/d", "output_dir=/o", *overrides])


# ------------------------------------------------------------------------------------ tf32, cudnn, fused AdamW
@pytest.mark.parametrize("device, overrides, want", [
    ("cuda", [], {"tf32": True, "cudnn_benchmark": True}),  # the defaults on a GPU
    ("cuda", ["train.tf32=false", "train.cudnn_benchmark=false"], {"tf32": False, "cudnn_benchmark": False}),
    ("cpu", [], {"tf32": False, "cudnn_benchmark": False}),  # CUDA-only flags: off on CPU whatever the config
])
def test_backend_flags_by_device(device, overrides, want):
    from mmcat.train.speed import backend_flags

    assert backend_flags(device, _cfg(*overrides)) == want


def test_backend_flags_on_cpu_leave_torch_as_it_was():
    from mmcat.train.speed import apply_backend_flags

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    apply_backend_flags(torch.device("cpu"), _cfg("train.tf32=true", "train.cudnn_benchmark=true"))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark) == before


@pytest.mark.parametrize("device, deepspeed, fused", [("cuda", False, True), ("cuda", True, False),
                                                       ("cpu", False, False)])
def test_fused_adamw_only_on_cuda_without_deepspeed(device, deepspeed, fused):
    from mmcat.train.optim import build_optimizer

    class Parts(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def param_groups(self, lr_image, lr_text, lr_head, weight_decay):
            return [{"name": "image", "params": self.a.parameters(), "lr": lr_image},
                    {"name": "head", "params": self.b.parameters(), "lr": lr_head}]

    opt = build_optimizer(Parts(), _cfg(), device, deepspeed)
    assert isinstance(opt, torch.optim.AdamW) and bool(opt.defaults.get("fused")) is fused
    assert [g["name"] for g in opt.param_groups] == ["image", "head"]


# ------------------------------------------------------------------------------------------ gradient checkpointing
def _batch():
    """Four samples of random pixels and token ids (uint8 64 px photos, 12 tokens) and their labels."""
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=g),
              torch.randint(1000, 2000, (4, 12), generator=g), torch.ones(4, 12, dtype=torch.long))
    return inputs, torch.tensor([0, 1, 2, 1])


def _step(model, inputs, labels):
    """One training forward + backward; returns (loss, grads by name, bytes autograd kept for backward outside
    checkpointed regions)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the text encoder's dropout: the same masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, aux = model(*inputs, labels=labels)
        loss = nn.functional.cross_entropy(logits, labels) + sum(
            nn.functional.cross_entropy(a_logits, labels) for a_logits, _ in aux.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved)


def test_grad_checkpointing_keeps_loss_gradients_and_norm_statistics_and_saves_memory(tiny_text):
    import copy

    from mmcat.models import build_model
    from train_helpers import model_cfg

    torch.manual_seed(0)
    plain = build_model(model_cfg(tiny_text, "model.modality_dropout=0.0", "model.image.channels_last=false"),
                        num_labels=3).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.enable_grad_checkpointing()
    inputs, labels = _batch()

    loss_a, grads_a, kept_a = _step(plain, inputs, labels)
    loss_b, grads_b, kept_b = _step(checkpointed, inputs, labels)

    assert torch.allclose(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(plain.parameters()))
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6), name
    # the recomputation in backward must not move BatchNorm's running statistics a second time
    state_a, state_b = plain.state_dict(), checkpointed.state_dict()
    assert state_a.keys() == state_b.keys()  # checkpointing adds nothing to what is saved
    for key in (k for k in state_a if "running_" in k or "num_batches_tracked" in k):
        assert torch.allclose(state_a[key].float(), state_b[key].float(), rtol=1e-5, atol=1e-6), key
    print("saved-for-backward bytes without / with checkpointing:", kept_a, kept_b)
    assert kept_b < 0.5 * kept_a, (kept_a, kept_b)


# ------------------------------------------------------------------------------------ model.text.trainable_layers
def test_text_trainable_layers_trains_the_top_layers_only_with_the_same_gradients_and_no_backward_below(tiny_text):
    import copy

    from mmcat.models import build_model
    from mmcat.models.text import lock_lower_layers
    from mmcat.train.optim import build_optimizer
    from train_helpers import model_cfg

    torch.manual_seed(0)
    full = build_model(model_cfg(tiny_text, "model.modality_dropout=0.0"), num_labels=3).train()
    locked = copy.deepcopy(full)
    lock_lower_layers(locked.text_encoder.backbone, 1)  # what model.text.trainable_layers=1 does at build
    built = build_model(model_cfg(tiny_text, "model.text.trainable_layers=1"), num_labels=3)
    assert ({n for n, p in built.named_parameters() if not p.requires_grad}
            == {n for n, p in locked.named_parameters() if not p.requires_grad})
    inputs, labels = _batch()

    loss_full, grads_full, kept_full = _step(full, inputs, labels)
    loss_locked, grads_locked, kept_locked = _step(locked, inputs, labels)

    text = "text_encoder.backbone."
    top = f"{text}encoder.layer.1."  # the tiny BERT has 2 layers: only the second trains
    frozen = {n for n, _ in locked.named_parameters() if n.startswith(text) and not n.startswith(top)}
    assert any(n.startswith(f"{text}embeddings.") for n in frozen) and any(".layer.0." in n for n in frozen)
    assert torch.equal(loss_full, loss_locked)  # locking changes no forward
    assert set(grads_locked) == set(grads_full) - frozen  # no gradient below the top layer ...
    for name, grad in grads_locked.items():  # ... and exactly the same gradients above it
        assert torch.allclose(grad, grads_full[name], rtol=1e-5, atol=1e-7), name
    assert kept_locked < kept_full  # autograd keeps nothing for the frozen layers' backward
    opt = build_optimizer(locked, _cfg())
    in_optimizer = {id(p) for group in opt.param_groups for p in group["params"]}
    assert all(id(p) not in in_optimizer for n, p in locked.named_parameters() if n in frozen)
    before = copy.deepcopy(locked.state_dict())
    opt.step()
    after = locked.state_dict()
    for name in before:
        if name in frozen:
            assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before[f"{top}output.dense.weight"], after[f"{top}output.dense.weight"])


def test_text_trainable_layers_beyond_the_encoder_is_a_config_error(tiny_text):
    from mmcat.config import ConfigError
    from mmcat.models import build_model
    from train_helpers import model_cfg

    with pytest.raises(ConfigError, match="'model.text.trainable_layers' is 3 but the text encoder has 2 layers"):
        build_model(model_cfg(tiny_text, "model.text.trainable_layers=3"), num_labels=3)


# ----------------------------------------------------------------------------------------------------- compile
@pytest.mark.parametrize("length, max_length, want", [(5, 64, 16), (16, 64, 16), (17, 64, 32), (60, 64, 64),
                                                      (60, 70, 64), (69, 70, 70), (3, 3, 3), (20, 20, 20)])
def test_bucket_length(length, max_length, want):
    from mmcat.train.speed import bucket_length

    assert bucket_length(length, max_length) == want


def test_compiled_training_with_bucketed_text_compiles_once_and_keeps_the_loss(tiny_text):
    """Batches whose texts have 5..14 tokens: bucketed to 16, one graph for all; unbucketed, each new length is
    a new input shape (a recompile, after which PyTorch makes the length dynamic). The padding changes no loss."""
    import torch._dynamo

    from mmcat.models import build_model
    from mmcat.train.speed import compile_model, compiled_graphs, pad_text_to_bucket
    from train_helpers import model_cfg

    cfg = model_cfg(tiny_text, "model.modality_dropout=0.0", "model.aux_loss_weight=0.0", "model.dropout=0.0",
                    "model.modalities=[text]")
    torch.manual_seed(0)
    model = build_model(cfg, num_labels=3).eval()  # eval: no dropout, so eager and compiled losses compare
    labels = torch.tensor([0, 1, 2, 1])
    batches = []
    for length in (5, 9, 14, 7):
        ids = torch.randint(1000, 2000, (4, length), generator=torch.Generator().manual_seed(length))
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    def losses(padded: bool):
        out = []
        for b in batches:
            b = pad_text_to_bucket(b, pad_id=0, max_length=64) if padded else b
            logits = model(torch.zeros(4, 3, 8, 8), b["input_ids"], b["attention_mask"])
            out.append(nn.functional.cross_entropy(logits, labels).item())
        return out

    eager = losses(padded=False)
    torch._dynamo.reset()
    compile_model(model, backend="eager")  # dynamo's graph capture and guards, without inductor's C++ build time
    start = compiled_graphs()
    bucketed = losses(padded=True)
    graphs_bucketed = compiled_graphs() - start
    torch._dynamo.reset()
    start = compiled_graphs()
    unbucketed = losses(padded=False)
    graphs_unbucketed = compiled_graphs() - start
    print("graphs compiled over 4 text lengths: bucketed", graphs_bucketed, "unbucketed", graphs_unbucketed)
    assert bucketed == pytest.approx(eager, abs=1e-5) and unbucketed == pytest.approx(eager, abs=1e-5)
    assert graphs_bucketed == 1 and graphs_unbucketed > 1


# --------------------------------------------------------------------------------------------------------- MFU
def test_flops_per_sample_is_three_forwards_as_counted():
    from mmcat.train.perf import training_flops_per_sample

    layer = nn.Linear(8, 4)
    x = torch.randn(5, 8)
    # one forward: 5 x 8 x 4 multiply-adds = 320 FLOPs; forward + backward = 3x; per sample /5
    assert training_flops_per_sample(lambda: layer(x), batch_size=5) == 3 * 2 * 5 * 8 * 4 / 5


def test_flops_per_sample_of_the_tiny_model_matches_flop_counter(tiny_text):
    from torch.utils.flop_counter import FlopCounterMode

    from mmcat.models import build_model
    from mmcat.train.perf import training_flops_per_sample
    from train_helpers import model_cfg

    model = build_model(model_cfg(tiny_text), num_labels=3).eval()
    inputs = (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.randint(1000, 2000, (2, 10)),
              torch.ones(2, 10, dtype=torch.long))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*inputs)
    counted = counter.get_total_flops()
    assert counted > 0 and training_flops_per_sample(lambda: model(*inputs), batch_size=2) == 3 * counted / 2


@pytest.mark.parametrize("name, precision, tf32, want", [
    ("NVIDIA H100 80GB HBM3", "bf16", True, 989e12), ("NVIDIA H100 PCIe", "bf16", True, 756e12),
    ("NVIDIA A100-SXM4-80GB", "no", True, 156e12), ("NVIDIA A100-SXM4-80GB", "no", False, None),
    ("cpu", "bf16", False, None), ("Some Future GPU", "bf16", True, None)])
def test_peak_flops_table(name, precision, tf32, want):
    from mmcat.train.perf import peak_flops

    assert peak_flops(name, precision, tf32) == want


def test_mfu_is_flops_rate_over_peak_and_absent_without_a_peak():
    from mmcat.train.perf import perf_scalars

    got = perf_scalars(flops_per_sample=1e9, samples_per_s=400.0, world_size=2, peak=1e12)
    assert got == pytest.approx({"perf/samples_per_s_per_device": 200.0, "perf/flops_per_sample": 1e9,
                                 "perf/flops_per_s_per_device": 2e11, "perf/mfu": 0.2})
    assert "perf/mfu" not in perf_scalars(1e9, 400.0, 1, peak=None)


def test_a_training_run_logs_perf_scalars(baseline_run):
    from train_helpers import tb_scalars

    flops = tb_scalars(baseline_run, "perf/flops_per_sample")
    per_device = tb_scalars(baseline_run, "perf/samples_per_s_per_device")
    rate = tb_scalars(baseline_run, "train/samples_per_s")
    assert flops and set(flops) == set(rate) == set(per_device)  # at every logged step
    assert all(v > 1e6 for v in flops.values())  # ResNet-18 at 32 px alone is ~150 MFLOPs per forward
    assert per_device == pytest.approx(rate, rel=1e-5)  # one process
    assert tb_scalars(baseline_run, "perf/mfu") == {}  # CPU: no known peak, no MFU


def test_compiled_checkpointed_training_matches_eager_and_does_not_recompile(tiny_text):
    """train.compile with train.grad_checkpointing: the same gradients and BatchNorm statistics as eager, and no
    recompile from one step to the next (a split trunk rebuilt per call used to recompile every step)."""
    import copy

    import torch._dynamo

    from mmcat.models import build_model
    from mmcat.train.speed import compile_model, compiled_graphs
    from train_helpers import model_cfg

    torch.manual_seed(0)
    plain = build_model(model_cfg(tiny_text, "model.modality_dropout=0.0", "model.image.channels_last=false",
                                  "model.modalities=[image]"), num_labels=3).train()
    fast = copy.deepcopy(plain)
    fast.enable_grad_checkpointing()
    torch._dynamo.reset()
    compile_model(fast, backend="aot_eager")  # AOTAutograd as Inductor uses it, without the C++ build time
    labels, graphs = torch.tensor([0, 1, 2, 1]), []
    for step in range(3):
        x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(step))
        for model in (plain, fast):
            model.zero_grad(set_to_none=True)
            model.training_progress = step / 3
            logits, _ = model(x, torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1, dtype=torch.long),
                              labels=labels)
            nn.functional.cross_entropy(logits, labels).backward()
        graphs.append(compiled_graphs())
        for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), (step, name)
    assert graphs[0] == graphs[-1], graphs
    a, b = plain.state_dict(), fast.state_dict()
    for key in (k for k in a if "running_" in k or "num_batches_tracked" in k):
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-5, atol=1e-6), key
