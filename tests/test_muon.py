"""muon.py: Newton-Schulz orthogonalisation, the Muon step, the combined optimizer's state."""

import pytest
import torch

from muon import CombinedOptimizer, Muon, newton_schulz


@pytest.mark.parametrize("shape", [(64, 32), (32, 96), (256, 64)])
def test_newton_schulz_is_close_to_orthogonal_for_random_matrices(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    out = newton_schulz(g).float()
    assert out.shape == g.shape and out.dtype == torch.float32
    s = torch.linalg.svdvals(out)
    # The quintic is tuned for speed, not convergence: singular values land in a band near 1.
    assert s.max() < 1.25 and s.min() > 0.55
    # ... along the gradient's own singular vectors: U V^T of the input is what it approximates.
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cosine = (out * (u @ vh)).sum() / (out.norm() * (u @ vh).norm())
    assert cosine > 0.95


def test_newton_schulz_on_an_ill_conditioned_matrix():
    gen = torch.Generator().manual_seed(1)
    # Rank-8 signal with singular values spanning 1e4, plus tiny noise: condition number ~1e7.
    left, _ = torch.linalg.qr(torch.randn(128, 8, generator=gen))
    right, _ = torch.linalg.qr(torch.randn(96, 8, generator=gen))
    g = left @ torch.diag(torch.logspace(0, 4, 8)) @ right.t() + 1e-3 * torch.randn(128, 96, generator=gen)
    s = torch.linalg.svdvals(newton_schulz(g).float())
    assert torch.isfinite(s).all()
    assert s[:8].max() < 1.25  # no blow-up of the large directions
    assert s[:8].min() > 0.1  # the smallest signal direction (1e4 x weaker) is lifted towards 1
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(torch.randn(3, 4, 5))


def test_muon_step_reduces_loss_of_a_small_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=gen)
    target = x @ torch.randn(32, 16, generator=gen)
    w = torch.nn.Parameter(torch.zeros(16, 32))
    opt = Muon([w], lr=0.1)  # a fixed-size (spectral norm ~lr) step: lr sets how close it can get
    losses = []
    for _ in range(60):
        loss = ((x @ w.t() - target) ** 2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[1] < losses[0] and losses[-1] < 0.1 * losses[0]


def test_split_orthogonalises_row_blocks_separately():
    g = torch.randn(96, 32, generator=torch.Generator().manual_seed(2))
    w = torch.nn.Parameter(torch.zeros(96, 32))
    w.grad = g.clone()
    Muon([{"params": [w], "split": 3}], lr=1.0, momentum=0.0).step()
    for i in range(3):  # each (32, 32) block of -update is NS of the matching gradient block
        assert torch.allclose(
            -w.data[32 * i : 32 * (i + 1)], newton_schulz(g[32 * i : 32 * (i + 1)]).float(), atol=1e-6
        )
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


def test_combined_optimizer_state_round_trip_continues_identically():
    def make(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
        matrices = [p for p in model.parameters() if p.ndim == 2]
        others = [p for p in model.parameters() if p.ndim < 2]
        opt = CombinedOptimizer(adamw=torch.optim.AdamW(others, lr=1e-2), muon=Muon(matrices, lr=0.02))
        return model, opt

    def train(model, opt, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            loss = model(torch.randn(32, 8, generator=gen)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    straight, opt = make(0)
    train(straight, opt, 3, seed=1)
    state = opt.state_dict()
    assert "momentum_buffer" in str(state["muon"]["state"][0].keys())
    train(straight, opt, 3, seed=2)

    resumed, opt2 = make(0)
    train(resumed, opt2, 3, seed=1)
    fresh, opt3 = make(0)
    fresh.load_state_dict(resumed.state_dict())
    opt3.load_state_dict(opt2.state_dict())
    train(fresh, opt3, 3, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), fresh.parameters()))
    # A checkpoint of another --optimizer is refused before anything loads, in the trainer's one place
    # (checkpoint.resume_problem; tests/test_recipe.py resumes a Muon checkpoint with AdamW).
