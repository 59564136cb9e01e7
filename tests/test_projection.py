"""random_projection and the ProjectedMSELoss module."""
import pytest
import torch

import cex_kernels
from cex_kernels import ProjectedMSELoss, random_projection


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "orthogonal"])
def test_deterministic_per_seed_and_dtype(kind):
    a = random_projection(64, 16, seed=3, kind=kind)
    b = random_projection(64, 16, seed=3, kind=kind)
    c = random_projection(64, 16, seed=4, kind=kind)
    assert torch.equal(a, b) and not torch.equal(a, c)
    wide = random_projection(64, 16, seed=3, kind=kind, dtype=torch.float64)
    assert torch.equal(wide.float(), a)  # drawn once in float64, then cast
    meta = random_projection(64, 16, seed=3, kind=kind, device="meta")
    assert meta.shape == (64, 16) and meta.device.type == "meta"
    if torch.cuda.is_available():
        assert torch.equal(random_projection(64, 16, seed=3, kind=kind, device="cuda").cpu(), a)


def test_gaussian_variance_is_one_over_d_out():
    p = random_projection(512, 128, seed=0, kind="gaussian", dtype=torch.float64)
    assert abs(p.var().item() * 128 - 1.0) < 0.02
    assert abs(p.mean().item()) < 0.01


def test_rademacher_values():
    p = random_projection(100, 25, seed=0, kind="rademacher", dtype=torch.float64)
    assert torch.allclose(p.abs(), torch.full_like(p, 0.2))
    assert 0.4 < (p > 0).double().mean().item() < 0.6


@pytest.mark.parametrize("d_in,d_out", [(64, 16), (16, 64), (32, 32)])
def test_orthogonal_is_norm_preserving_in_expectation(d_in, d_out):
    p = random_projection(d_in, d_out, seed=1, kind="orthogonal", dtype=torch.float64)
    if d_in >= d_out:  # orthonormal columns, scaled so that E[P Pᵀ] = I
        gram = p.T @ p * (d_out / d_in)
        assert torch.allclose(gram, torch.eye(d_out, dtype=torch.float64), atol=1e-10)
    else:
        assert torch.allclose(p @ p.T, torch.eye(d_in, dtype=torch.float64), atol=1e-10)
    assert abs(torch.trace(p @ p.T).item() / d_in - 1.0) < 1e-10


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        random_projection(4, 2, seed=0, kind="sparse")
    with pytest.raises(ValueError, match="positive"):
        random_projection(0, 2, seed=0)
    with pytest.raises(TypeError, match="floating"):
        random_projection(4, 2, seed=0, dtype=torch.int32)


def test_loss_module_matches_functional():
    torch.manual_seed(0)
    loss_fn = ProjectedMSELoss(12, 5, seed=7, kind="rademacher")
    s, t = torch.randn(3, 4, 5, requires_grad=True), torch.randn(3, 4, 12)
    expected = cex_kernels.projected_mse(s, t, random_projection(12, 5, seed=7, kind="rademacher"))
    torch.testing.assert_close(loss_fn(s, t), expected)


def test_state_dict_stores_seed_not_matrix():
    loss_fn = ProjectedMSELoss(12, 5, seed=7)
    state = loss_fn.state_dict()
    assert "projection" not in state
    assert state["_extra_state"]["seed"] == 7
    other = ProjectedMSELoss(12, 5, seed=99)
    other.load_state_dict(state)
    assert other.seed == 7 and torch.equal(other.projection, loss_fn.projection)
    with pytest.raises(ValueError, match=r"\(12, 5\)"):
        ProjectedMSELoss(12, 6).load_state_dict(state)


def test_learnable_regressor_is_fitnets():
    # learnable=True regresses the *student* into the teacher's space: MSE(s @ W, t).
    loss_fn = ProjectedMSELoss(8, 4, seed=0, learnable=True).double()
    assert "regressor" in loss_fn.state_dict() and loss_fn.regressor.shape == (4, 8)
    s = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(10, 8, dtype=torch.float64)
    loss = loss_fn(s, t)
    loss.backward()
    # the float64 oracle, written out, on separate leaves
    s_ref = s.detach().requires_grad_()
    w_ref = loss_fn.regressor.detach().clone().requires_grad_()
    expected = ((s_ref @ w_ref - t) ** 2).mean()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(s.grad, s_ref.grad)
    torch.testing.assert_close(loss_fn.regressor.grad, w_ref.grad)


def test_learnable_joint_training_does_not_collapse():
    # Trained jointly with the student's features, the old mode (a projection of the
    # *teacher*) drove both to 0 (loss 1.7e-5, ||P|| 7.97 -> 0.042). FitNets cannot collapse:
    # the teacher's features are a fixed target, so the loss is bounded below by how well
    # s @ W can fit them, and the student must carry the teacher's information.
    torch.manual_seed(0)
    teacher = torch.randn(256, 16)
    student_in = torch.randn(256, 16)
    student = torch.nn.Linear(16, 6)
    loss_fn = ProjectedMSELoss(16, 6, seed=1, learnable=True)
    opt = torch.optim.Adam(list(student.parameters()) + list(loss_fn.parameters()), lr=1e-2)
    start_norm = loss_fn.regressor.norm().item()
    for _ in range(300):
        opt.zero_grad()
        loss = loss_fn(student(student_in), teacher)
        loss.backward()
        opt.step()
    final = loss_fn(student(student_in), teacher).item()
    # The best rank-6 linear fit of the teacher from the inputs, in float64: the loss
    # cannot go (much) below it, and training should get close to it.
    x = torch.cat([student_in, torch.ones(256, 1)], 1).double()
    coef = torch.linalg.lstsq(x, teacher.double()).solution
    u, sv, vh = torch.linalg.svd(x @ coef, full_matrices=False)
    best = ((teacher.double() - (u[:, :6] * sv[:6]) @ vh[:6]) ** 2).mean().item()
    assert final > 0.9 * best, (final, best)  # no collapse below what a fit allows
    assert final < 1.2 * best + 0.02, (final, best)  # and it did learn
    assert loss_fn.regressor.norm().item() > 0.25 * start_norm


def test_module_casts_projection_to_input_dtype():
    loss_fn = ProjectedMSELoss(8, 4)
    s, t = torch.randn(10, 4, dtype=torch.bfloat16), torch.randn(10, 8, dtype=torch.bfloat16)
    assert loss_fn(s, t).dtype == torch.bfloat16
