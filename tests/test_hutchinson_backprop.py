"""Hutchinson's estimate from the walk of the recorded forward pass (``hutchinson_backprop``) equals
the one from autograd's Hessian-vector products (torch.func, reverse over reverse) for the same
probes, to float rounding; several probe sets in one pass equal successive calls."""

import pytest
import torch
from torch import nn

from hsbench.curvature import autograd_estimators, hutchinson_backprop, native
from hsbench.experiments.networks import mlp

CASES = [  # inputs, width, depth, classes, activation, batch, loss
    (12, 6, 2, 4, "tanh", 1, nn.CrossEntropyLoss()),
    (6, 5, 3, 3, "elu", 4, nn.CrossEntropyLoss()),
    (5, 4, 2, 3, "sigmoid", 3, nn.CrossEntropyLoss(reduction="sum")),
    (5, 4, 1, 2, "relu", 2, nn.MSELoss()),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[4]}-N{c[5]}" for c in CASES])
def test_walk_equals_autograd_for_the_same_probes(case, monkeypatch):
    inputs, width, depth, classes, activation, n, loss_fn = case
    torch.manual_seed(0)
    model = mlp(inputs, width, depth, classes, activation).double()
    x = torch.randn(n, inputs, dtype=torch.float64)
    y = torch.randn(n, classes, dtype=torch.float64) if isinstance(loss_fn, nn.MSELoss) else torch.randint(0, 3, (n,))
    tape = autograd_estimators._tape_or_none(model, loss_fn, x, y)
    assert tape is not None and hutchinson_backprop.supported(tape)

    def sets(use_walk: bool) -> list[dict[str, torch.Tensor]]:
        with monkeypatch.context() as patch:
            if not use_walk:
                patch.setattr(hutchinson_backprop, "supported", lambda tape: False)
            return autograd_estimators.hutchinson_sets(model, loss_fn, x, y, [1, 7], torch.Generator().manual_seed(3))

    walk, autograd = sets(True), sets(False)
    generator = torch.Generator().manual_seed(3)
    successive = [autograd_estimators.hutchinson(model, loss_fn, x, y, m, generator) for m in (1, 7)]
    for found, reference, one_by_one in zip(walk, autograd, successive, strict=True):
        assert found.keys() == reference.keys() == dict(model.named_parameters()).keys()
        for name, value in found.items():
            scale = float(reference[name].abs().max())
            assert scale > 1e-6  # every parameter's estimate is non-trivial here
            torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-13 * scale)
            torch.testing.assert_close(one_by_one[name], value, rtol=0, atol=1e-13 * scale)


def test_networks_the_walk_does_not_know_go_through_autograd(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)).double()
    x, y = torch.randn(2, 1, 10, dtype=torch.float64), torch.tensor([0, 2])
    loss_fn = nn.CrossEntropyLoss()
    tape = autograd_estimators._tape_or_none(model, loss_fn, x, y)
    assert tape is not None and not hutchinson_backprop.supported(tape)
    monkeypatch.setattr(hutchinson_backprop, "backpropagate", lambda *args: pytest.fail("the walk was used"))
    found = autograd_estimators.hutchinson(model, loss_fn, x, y, 3, torch.Generator().manual_seed(0))

    # reference: the same probes, each Hessian-vector product by torch.autograd.functional.hvp
    names = [name for name, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    probes = autograd_estimators.rademacher(dict(zip(names, params, strict=True)), 3, torch.Generator().manual_seed(0))

    def loss(*values):
        return loss_fn(torch.func.functional_call(model, dict(zip(names, values, strict=True)), (x,)), y)

    products = [
        torch.autograd.functional.hvp(loss, params, tuple(probes[name][m] for name in names))[1] for m in range(3)
    ]
    assert found.keys() == set(names)
    for i, name in enumerate(names):
        reference = torch.stack([probes[name][m] * products[m][i] for m in range(3)]).mean(0)
        torch.testing.assert_close(found[name], reference, rtol=1e-12, atol=1e-14)


def test_probes_unpacked_only_where_the_inputs_are_nonzero_give_the_same_estimates_and_draws(monkeypatch):
    """Blank input columns (every sample 0 there, as MNIST's background) make the first weight's
    estimate 0 in those columns: its probes are unpacked only in the 8-column blocks with a
    nonzero input (``needed_blocks``), from the same random bytes as the full probes."""
    torch.manual_seed(0)
    model = mlp(24, 5, 2, 3, "tanh").double()
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(2, 24, dtype=torch.float64)
    x[:, 8:16] = 0  # block 1 blank in both samples
    x[0, :3], x[1, 20:] = 0, 0  # blocks 0 and 2 partly blank
    y = torch.tensor([0, 2])
    tape = autograd_estimators._tape_or_none(model, loss_fn, x, y)
    assert tape is not None
    first = next(m for m in model if isinstance(m, nn.Linear)).weight
    (name,) = [n for n, p in model.named_parameters() if p is first]
    (blocks,) = hutchinson_backprop.needed_blocks(tape).values()
    assert hutchinson_backprop.needed_blocks(tape).keys() == {first} and blocks.tolist() == [0, 2]

    # the probes: the full draw's entries in columns 0-7 and 16-23, and the generator left as by the full draw
    params = autograd_estimators._parameters(model)
    full_draw, blocked_draw = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    full = autograd_estimators.rademacher_sets(params, [1, 7], full_draw)
    blocked = autograd_estimators.rademacher_sets(params, [1, 7], blocked_draw, {name: blocks})
    kept = [*range(8), *range(16, 24)]
    assert torch.equal(blocked[name], full[name][:, :, kept])
    assert all(torch.equal(blocked[other], full[other]) for other in params if other != name)
    assert torch.equal(blocked_draw.get_state(), full_draw.get_state())
    packed_draw = torch.Generator().manual_seed(5)
    packed = autograd_estimators.rademacher_sets(params, [1, 7], packed_draw, {name: blocks}, packed=True)
    assert packed[name].dtype == torch.uint8 and packed[name].shape == (8, 5, 2)  # (probes, rows, kept blocks)
    unpacked = autograd_estimators._SIGNS[packed[name].long()].flatten(-2).double()
    assert torch.equal(unpacked, blocked[name])
    assert all(torch.equal(packed[other], full[other]) for other in params if other != name)
    assert torch.equal(packed_draw.get_state(), full_draw.get_state())

    # the estimates: equal to those from the full probes, exactly 0 in the blank block
    # (blocks kept as bits for the compiled loops, blocks unpacked, full probes)
    def estimates(use_blocks: bool, bits: bool = False) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
        generator = torch.Generator().manual_seed(3)
        with monkeypatch.context() as patch:
            if not use_blocks:
                patch.setattr(hutchinson_backprop, "needed_blocks", lambda tape: {})
            if not bits:
                patch.setattr(native, "available", lambda dtype: False)
            calls = []
            patch.setattr(native, "probe_contraction", lambda *args: calls.append(1) or contraction(*args))
            found = autograd_estimators.hutchinson_sets(model, loss_fn, x, y, [1, 7], generator)
            assert len(calls) == (2 * len(x) if bits else 0)  # per probe set and sample
        return found, torch.randint(0, 2**31, (4,), generator=generator)  # the draws that follow

    contraction = native.probe_contraction
    (found, after), (reference, after_reference) = estimates(True), estimates(False)
    assert torch.equal(after, after_reference)
    compared = list(zip(found, reference, strict=True))
    if native.available(torch.float64):  # the probes kept as bits, read by the compiled loops
        bits, after_bits = estimates(True, bits=True)
        assert torch.equal(after_bits, after_reference)
        compared += zip(bits, reference, strict=True)
    for estimate, expected in compared:
        assert estimate.keys() == expected.keys() == params.keys()
        for key, value in estimate.items():
            scale = float(expected[key].abs().max())
            assert scale > 1e-6
            torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-13 * scale)
        assert torch.equal(estimate[name][:, 8:16], torch.zeros(5, 8, dtype=torch.float64))
        assert bool((estimate[name][:, kept] != 0).all())


@pytest.mark.parametrize("inputs, blank", [(24, True), (12, False)])
def test_blank_inputs_and_a_width_not_divisible_by_8_give_the_full_probes_estimates(inputs, blank, monkeypatch):
    """An all-blank input keeps no block of the first weight (its estimate is 0, the draws as the
    full ones'); with 12 input columns a random byte spans two rows, so no column is skipped. The
    reference: autograd's Hessian-vector products with the full probes of the same draws."""
    torch.manual_seed(0)
    model = mlp(inputs, 5, 2, 3, "tanh").double()
    x = torch.zeros(2, inputs, dtype=torch.float64) if blank else torch.randn(2, inputs, dtype=torch.float64)
    y, loss_fn = torch.tensor([0, 2]), nn.CrossEntropyLoss()
    tape = autograd_estimators._tape_or_none(model, loss_fn, x, y)
    first = next(m for m in model if isinstance(m, nn.Linear)).weight
    (first_name,) = [n for n, p in model.named_parameters() if p is first]
    blocks = hutchinson_backprop.needed_blocks(tape)
    assert (blocks[first].numel() == 0) if blank else (blocks == {})

    def estimates(walk: bool):
        generator = torch.Generator().manual_seed(3)
        with monkeypatch.context() as patch:
            if not walk:
                patch.setattr(hutchinson_backprop, "supported", lambda tape: False)
            found = autograd_estimators.hutchinson_sets(model, loss_fn, x, y, [1, 7], generator)
        return found, torch.randint(0, 2**31, (4,), generator=generator)

    (found, after), (reference, after_reference) = estimates(True), estimates(False)
    assert torch.equal(after, after_reference)
    for estimate, expected in zip(found, reference, strict=True):
        for key, value in estimate.items():
            torch.testing.assert_close(value, expected[key], rtol=1e-10, atol=1e-12)
        assert bool((estimate[first_name] == 0).all()) == blank


def test_probes_are_the_bits_of_one_random_byte_draw_per_set_and_parameter():
    """The stream that the stored Hutchinson results fix: per set, then per parameter, one
    ``torch.randint`` of ⌈samples · numel / 8⌉ bytes, entry 8·i + k the bit k of byte i (least
    significant first), 1 as +1 and 0 as −1; sets that end inside a byte (15 and 7 entries) included."""
    params = {
        "a": torch.zeros(5, 3, dtype=torch.float64),
        "b": torch.zeros(4, 8, dtype=torch.float64),
        "c": torch.zeros(7, dtype=torch.float32),
    }
    counts = [1, 7, 2]
    generator, reference_generator = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    found = autograd_estimators.rademacher_sets(params, counts, generator)
    expected: dict[str, list[torch.Tensor]] = {k: [] for k in params}
    for samples in counts:
        for k, p in params.items():
            n = samples * p.numel()
            drawn = torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8, generator=reference_generator)
            bits = (drawn.unsqueeze(1).long() >> torch.arange(8)) & 1
            expected[k].append((2 * bits - 1).flatten()[:n].to(p.dtype).view(samples, *p.shape))
    for k, p in params.items():
        assert found[k].dtype == p.dtype and torch.equal(found[k], torch.cat(expected[k]))
    assert torch.equal(generator.get_state(), reference_generator.get_state())
