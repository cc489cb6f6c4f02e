import pytest
import torch

from infinite_id.method.ops import adain_mean, average_identity, interpolate_identities, stack_identities


def test_adain_mean_moves_the_mean_exactly_and_keeps_centred_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 6, generator=g) * 3 + 1
    y = torch.randn(2, 7, 6, generator=g) * 0.5 - 2
    out = adain_mean(x, y, strength=1.0)
    torch.testing.assert_close(out.mean(dim=1), y.mean(dim=1), atol=1e-5, rtol=0)
    centred = lambda t: t - t.mean(dim=1, keepdim=True)  # noqa: E731
    torch.testing.assert_close(centred(out), centred(x), atol=1e-5, rtol=0)
    # The variance is untouched (full AdaIN would change it).
    torch.testing.assert_close(out.var(dim=1), x.var(dim=1), atol=1e-4, rtol=0)


def test_adain_mean_strength_interpolates_and_zero_is_identity():
    x, y = torch.randn(1, 5, 3), torch.randn(1, 4, 3)
    half = adain_mean(x, y, strength=0.5)
    torch.testing.assert_close(half.mean(dim=1), (x.mean(dim=1) + y.mean(dim=1)) / 2, atol=1e-5, rtol=0)
    assert adain_mean(x, y, strength=0.0) is x


def test_average_identity_renormalises_face_embeddings():
    a = torch.nn.functional.normalize(torch.randn(512), dim=0)
    b = torch.nn.functional.normalize(torch.randn(512), dim=0)
    mean = average_identity([a, b])
    assert torch.isclose(mean.norm(), torch.tensor(1.0), atol=1e-5)
    torch.testing.assert_close(mean, torch.nn.functional.normalize(a + b, dim=0))
    clip = average_identity(torch.stack([torch.ones(3, 2), 3 * torch.ones(3, 2)]), normalize=False)
    torch.testing.assert_close(clip, 2 * torch.ones(3, 2))
    with pytest.raises(ValueError, match="cancel out"):
        average_identity([a, -a])


def test_interpolate_and_stack_identities():
    a, b = torch.zeros(1, 4, 8), torch.ones(1, 4, 8)
    torch.testing.assert_close(interpolate_identities(a, b, 0.25), torch.full((1, 4, 8), 0.25))
    assert stack_identities([a, b]).shape == (1, 8, 8)
    with pytest.raises(ValueError, match="between 0 and 1"):
        interpolate_identities(a, b, 1.5)
    with pytest.raises(ValueError, match="same shape"):
        interpolate_identities(a, torch.ones(1, 5, 8), 0.5)
