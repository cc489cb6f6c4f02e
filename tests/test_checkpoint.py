"""Native checkpoints: bit-exact round trip, strict loading with named keys."""

import pytest
import torch
from conftest import generate
from safetensors.torch import load_file, save_file

from infinite_id.method.checkpoint import identity_state_dict, load_checkpoint, read_checkpoint, save_checkpoint
from infinite_id.testing import tiny_pipeline


@pytest.fixture
def saved(tmp_path):
    pipe = tiny_pipeline(seed=5)
    path = save_checkpoint(pipe, tmp_path / "id.safetensors", base_model="tiny")
    return pipe, path


def test_round_trip_is_bit_exact_and_changes_the_output(saved, identity):
    src, path = saved
    dst = tiny_pipeline(seed=0)
    before = generate(dst, id_embeds=identity).images
    meta = load_checkpoint(dst, path)
    assert meta["format"] == "infinite-id" and meta["base_model"] == "tiny" and meta["num_tokens"] == "21"
    a, b = identity_state_dict(src.unet, src.id_encoder), identity_state_dict(dst.unet, dst.id_encoder)
    assert a.keys() == b.keys() and any(k.startswith("image_proj.") for k in a) and any(k.startswith("ip_adapter.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (generate(dst, id_embeds=identity).images - before).abs().max() > 1e-2
    # Keys follow IP-Adapter numbering: attn2 layers sit at odd positions of unet.attn_processors.
    numbers = sorted({int(k.split(".")[1]) for k in a if k.startswith("ip_adapter.")})
    assert numbers and all(n % 2 == 1 for n in numbers)


def tamper(path, change):
    state = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    change(state)
    save_file(state, str(path), metadata=meta)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s: s.pop("ip_adapter.1.to_k_ip.weight"), "1 missing keys: ip_adapter.1.to_k_ip.weight"),
        (lambda s: s.__setitem__("ip_adapter.999.to_k_ip.weight", torch.zeros(1)), "1 unexpected keys: ip_adapter.999"),
        (lambda s: s.__setitem__("image_proj.clip_mapper.proj.weight", torch.zeros(64, 31)), "mis-shaped keys: image_proj.clip_mapper.proj.weight"),
    ],
)
def test_tampered_checkpoint_names_the_key_and_changes_nothing(saved, change, message):
    _, path = saved
    tamper(path, change)
    dst = tiny_pipeline(seed=0)
    before = {k: v.clone() for k, v in identity_state_dict(dst.unet, dst.id_encoder).items()}
    with pytest.raises(ValueError, match=message):
        load_checkpoint(dst, path)
    after = identity_state_dict(dst.unet, dst.id_encoder)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_truncated_and_foreign_files_are_clear_errors(saved, tmp_path):
    _, path = saved
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_checkpoint(cut)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a native Infinite-ID checkpoint"):
        read_checkpoint(foreign)
    with pytest.raises(ValueError, match="not found"):
        read_checkpoint(tmp_path / "nope.safetensors")
