"""The training-side RWKV-7 (rwkv_chat.training) and the embedded demo model.

* the chunked recurrence equals the per-step loop (values and gradients);
* a tiny model's loss falls over a few dozen steps;
* the exported official-layout state dict gives the oracle's logits (fp32), also after
  expansion from a local vocabulary to the 65536-row world vocabulary;
* demo_model_path() expands the shipped compact file into a checkpoint the oracle loads, and
  reuses it on the next call.
"""
from __future__ import annotations

import pytest
import torch

from rwkv_chat import demo
from rwkv_chat.training.rwkv7 import (
    RWKV7,
    UNSEEN_LOGIT,
    RWKV7Config,
    expand_to_world,
)
from rwkv_chat.engine.ops import torch_ref
from tests.oracle import oracle_logits_many

TOL = 1e-3


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: extra threads only add overhead (badly so on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).detach().abs().max() / reference.detach().abs().max())


def _wkv_inputs(B, T, H, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, w, k, v, kk, a = (torch.randn(B, T, H, N, generator=g, dtype=dtype) for _ in range(6))
    w = torch.exp(-0.606531 * torch.sigmoid(3 * w))  # the full decay range, down to ~0.545
    kk = torch.nn.functional.normalize(kk, dim=-1)
    a = torch.sigmoid(a)
    state = torch.randn(B, H, N, N, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (r, w, k, v, kk, a, state)]


def test_the_trainer_s_recurrence_backpropagates_like_the_step_loop():
    """The trainer runs the engine's chunked v7 recurrence (tests/engine/test_recurrences.py checks
    its values); its gradients, the state's included, match those through the per-token loop."""
    inputs = _wkv_inputs(2, 45, 2, 16, torch.float64)  # chunks of 32 and 13 tokens
    y_loop, s_loop = torch_ref.wkv7_loop(*inputs)
    y_chunk, s_chunk = torch_ref.wkv7(*inputs)
    assert relative_error(y_chunk, y_loop) < 1e-10 and relative_error(s_chunk, s_loop) < 1e-10
    loss = lambda y, s: y.square().sum() + s.square().sum()
    g_loop = torch.autograd.grad(loss(y_loop, s_loop), inputs)
    g_chunk = torch.autograd.grad(loss(y_chunk, s_chunk), inputs)
    for a, b in zip(g_chunk, g_loop):
        assert relative_error(a, b) < 1e-10


def _perturbed_model(cfg: RWKV7Config, seed: int) -> RWKV7:
    """A model with every parameter moved off its initial value (zeros hide bugs)."""
    model = RWKV7(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def test_loss_decreases_on_a_tiny_corpus():
    torch.manual_seed(0)
    text = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4] * 8)
    cfg = RWKV7Config(vocab_size=10, n_embd=64, n_layer=2, head_size=32, dim_w=8, dim_a=8, dim_v=8, dim_g=16)
    model = RWKV7(cfg, seed=0)
    opt = torch.optim.AdamW(model.param_groups(0.01), lr=3e-3)
    x, y = text[:-1].view(1, -1)[:, :144].repeat(2, 1), text[1:].view(1, -1)[:, :144].repeat(2, 1)
    losses = []
    for _ in range(40):
        loss = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert sum(losses[-5:]) / 5 < 1.0, losses


def test_export_layout():
    cfg = RWKV7Config(vocab_size=50, n_embd=128, n_layer=2, head_size=64, dim_w=8, dim_a=8, dim_v=4, dim_g=16)
    sd = RWKV7(cfg, seed=0).export()
    C, H, N = 128, 2, 64
    expected = {
        "emb.weight": (50, C), "head.weight": (50, C), "blocks.0.ln0.weight": (C,),
        "ln_out.weight": (C,), "ln_out.bias": (C,),
    }
    for i in range(2):
        p = f"blocks.{i}."
        expected.update({
            p + "ln1.weight": (C,), p + "ln2.bias": (C,),
            p + "att.x_r": (1, 1, C), p + "att.x_g": (1, 1, C), p + "att.w0": (1, 1, C),
            p + "att.w1": (C, 8), p + "att.w2": (8, C), p + "att.a0": (1, 1, C),
            p + "att.v0": (1, 1, C), p + "att.v1": (C, 4), p + "att.v2": (4, C),
            p + "att.g1": (C, 16), p + "att.g2": (16, C), p + "att.k_k": (1, 1, C),
            p + "att.k_a": (1, 1, C), p + "att.r_k": (H, N),
            p + "att.receptance.weight": (C, C), p + "att.output.weight": (C, C),
            p + "att.ln_x.weight": (C,), p + "ffn.x_k": (1, 1, C),
            p + "ffn.key.weight": (4 * C, C), p + "ffn.value.weight": (C, 4 * C),
        })
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in sd.values())
    assert sd["ln_out.weight"][-1] == 0 and sd["ln_out.bias"][-1] == 1  # the bias channel


@pytest.fixture(scope="module")
def oracle_cases(tmp_path_factory):
    """Checkpoints + our logits for every oracle comparison; the oracle runs once for all."""
    folder = tmp_path_factory.mktemp("training-export")
    cases = {}

    # Local-vocabulary model (vocab 300), two heads of 64; 32 tokens (chunked path) and 21 (loop)
    cfg = RWKV7Config(vocab_size=300, n_embd=128, n_layer=3, head_size=64, dim_w=16, dim_a=16, dim_v=8, dim_g=32)
    model = _perturbed_model(cfg, seed=11)
    sd = model.export()
    path = folder / "local.pth"
    torch.save(sd, path)
    g = torch.Generator().manual_seed(5)
    for name, length in (("chunked", 32), ("loop", 21)):
        tokens = torch.randint(0, 300, (length,), generator=g)
        with torch.no_grad():
            ours = model(tokens.view(1, -1))[0]
        cases[name] = (path, tokens.tolist(), ours)

    # The same model expanded to the world vocabulary: local id i is world id token_ids[i]
    token_ids = torch.randperm(65536, generator=g)[:300]
    path = folder / "world.pth"
    torch.save(expand_to_world(sd, token_ids), path)
    tokens = torch.randint(0, 300, (16,), generator=g)
    with torch.no_grad():
        ours = model(tokens.view(1, -1))[0]
    cases["world"] = (path, token_ids[tokens].tolist(), (ours, token_ids))

    # Three heads of 64 (not a power of two), two layers
    cfg = RWKV7Config(vocab_size=97, n_embd=192, n_layer=2, head_size=64, dim_w=8, dim_a=8, dim_v=8, dim_g=8)
    model = _perturbed_model(cfg, seed=12)
    path = folder / "three-heads.pth"
    torch.save(model.export(), path)
    tokens = torch.randint(0, 97, (48,), generator=g)
    with torch.no_grad():
        ours = model(tokens.view(1, -1))[0]
    cases["three_heads"] = (path, tokens.tolist(), ours)

    requests = [
        {"model_path": str(p), "strategy": "cpu fp32", "token_batches": [toks], "full_output": True}
        for p, toks, _ in cases.values()
    ]
    results = oracle_logits_many(requests)
    return {name: (case, res[0]) for (name, case), res in zip(cases.items(), results)}


@pytest.mark.parametrize("name", ["chunked", "loop", "three_heads"])
def test_export_matches_oracle(oracle_cases, name):
    (_, _, ours), reference = oracle_cases[name]
    assert reference.shape == ours.shape
    assert relative_error(ours, reference) < TOL


def test_world_expansion_matches_oracle(oracle_cases):
    (_, _, (ours, token_ids)), reference = oracle_cases["world"]
    assert reference.shape == (ours.shape[0], 65536)
    assert relative_error(ours, reference[:, token_ids]) < TOL
    unseen = torch.ones(65536, dtype=torch.bool)
    unseen[token_ids] = False
    assert torch.allclose(reference[:, unseen], torch.full_like(reference[:, unseen], UNSEEN_LOGIT), atol=1e-3)


def test_expand_requires_bias_channel():
    cfg = RWKV7Config(vocab_size=5, n_embd=64, n_layer=1, head_size=64, bias_channel=False)
    with pytest.raises(ValueError, match="bias channel"):
        expand_to_world(RWKV7(cfg, seed=0).export(), torch.arange(5))


def test_demo_model_path_expands_once_and_oracle_loads_it(tmp_path, monkeypatch):
    first = demo.demo_model_path(tmp_path)
    assert first.suffix == ".pth" and first.parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp files left behind
    sd = torch.load(first, map_location="cpu", weights_only=True, mmap=True)
    assert sd["emb.weight"].shape[0] == 65536 and sd["head.weight"].shape[0] == 65536
    assert "blocks.0.att.r_k" in sd

    # Second call: reused, not rewritten (expansion would fail if attempted)
    mtime = first.stat().st_mtime_ns
    def refuse(*args, **kwargs):
        raise AssertionError("expanded again")
    monkeypatch.setattr("rwkv_chat.demo.expand_to_world", refuse)
    assert demo.demo_model_path(tmp_path) == first
    assert first.stat().st_mtime_ns == mtime

    # A stale expansion of an older demo model is replaced
    stale = tmp_path / "rwkv7-demo-0000000000000000.pth"
    stale.write_bytes(b"old")
    monkeypatch.undo()
    first.unlink()
    again = demo.demo_model_path(tmp_path)
    assert again == first and not stale.exists()

    from rwkv_chat.tokenizer import Tokenizer

    tokens = Tokenizer().encode("User: Hi!\n\nAssistant:")
    (logits,) = oracle_logits_many([{"model_path": str(again), "strategy": "cpu fp32", "token_batches": [tokens]}])[0]
    assert logits.shape == (65536,) and torch.isfinite(logits).all()
    _, token_ids, _ = demo.load_compact()
    top = int(logits.argmax())
    assert top in set(token_ids.tolist())  # the demo only ever picks tokens it was trained on


def test_demo_compact_file_is_small_and_documented():
    path = demo.compact_path()
    assert path.stat().st_size <= 20 * 1024 * 1024
    tensors, token_ids, meta = demo.load_compact()
    assert tensors["emb.weight"].shape == (token_ids.numel(), meta["config"]["n_embd"])
    assert token_ids.unique().numel() == token_ids.numel() and int(token_ids.max()) < 65536
    # The note shown to users quotes the file's own numbers
    assert f"train {meta['final_train_loss']:.2f}" in demo.DEMO_MODEL_NOTE
    assert f"validation {meta['final_val_loss']:.2f}" in demo.DEMO_MODEL_NOTE
    assert f"{meta['train']['steps']} steps" in demo.DEMO_MODEL_NOTE
    readme = (demo.DEMO_DIR / "README.md").read_text()
    assert "chitchat-dataset" in readme and "MIT" in readme and "BSD" in readme
