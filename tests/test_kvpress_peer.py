"""The kvpress peer (nimblelm/bench/kvpress_peer.py): its env, and its presses on the packaged SmolLM2-135M.

The integration tests build the env on first use (about 10 s, from PyPI) and run the packaged model's fp32
weights, written once as a Hugging Face folder. A 300-token prompt at keep_ratio 0.25 keeps
int(300 * 0.25) = 75 positions per KV head, kvpress's compute_n_kept.
"""

import pytest
import torch

from nimblelm.bench import kvpress_peer

PROMPT_LEN = 300
KEEP = 0.25
N_KEPT = int(PROMPT_LEN * (1 - (1 - KEEP)))  # compute_n_kept(k_len, compression_ratio=1 - keep_ratio)


def test_a_failed_env_raises_one_error_with_pips_last_line(tmp_path, monkeypatch):
    """Offline: the requirement is a wheel that is not there, so pip fails before any download."""
    monkeypatch.setenv("NIMBLELM_CACHE", str(tmp_path / "cache"))
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"{tmp_path / 'kvpress-0.5.5-py3-none-any.whl'}\n")
    monkeypatch.setattr(kvpress_peer, "REQUIREMENTS", requirements)
    with pytest.raises(kvpress_peer.KvpressEnvError, match=r"\(pip install\): ERROR: .*No such file"):
        kvpress_peer.ensure_env()
    assert list((tmp_path / "cache" / "peers").iterdir()) == []  # nothing half-built left behind


@pytest.fixture(scope="module")
def smollm2(smollm2_hf):
    """The packaged model's Hugging Face folder, and a 300-token prompt of its own tokens."""
    folder, ids = smollm2_hf
    return folder, ids[:PROMPT_LEN]


@pytest.mark.integration
def test_env_is_created_once():
    python = kvpress_peer.ensure_env()
    assert python.exists()
    assert kvpress_peer.ensure_env() == python


@pytest.mark.integration
def test_streaming_keeps_the_sinks_and_the_recent_tokens(kvpress_on_smollm2):
    kept = kvpress_on_smollm2["streaming-300"][0]
    want = list(range(4)) + list(range(PROMPT_LEN - (N_KEPT - 4), PROMPT_LEN))
    assert len(kept) == 30  # SmolLM2-135M's layers
    for layer in kept:
        assert layer.dtype == torch.long and layer.shape == (3, N_KEPT)
        assert all(row == want for row in layer.tolist())


@pytest.mark.integration
def test_snapkv_keeps_its_window_and_chooses_per_head(kvpress_on_smollm2):
    kept = kvpress_on_smollm2["snapkv-300"][0]
    assert len(kept) == 30
    window = torch.arange(PROMPT_LEN - 64, PROMPT_LEN)
    for layer in kept:
        assert layer.dtype == torch.long and layer.shape == (3, N_KEPT)
        assert (layer.diff(dim=-1) > 0).all()  # ascending, no repeats
        assert (layer[:, -64:] == window).all()  # the observation window is always kept
    assert any((layer != layer[:1]).any() for layer in kept)  # the heads choose differently somewhere


@pytest.mark.integration
def test_generate_without_a_press_matches_transformers(smollm2):
    from transformers import AutoModelForCausalLM

    folder, ids = smollm2
    short = ids[:12]
    out = kvpress_peer.generate(folder, [short, ids], None, 1.0, 8)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model.generate(torch.tensor([short]), max_new_tokens=8, do_sample=False)[0, len(short):].tolist()
    assert out[0]["token_ids"] == ref
    assert all(o["prefill_s"] > 0 and o["decode_s"] > 0 for o in out)

    # kvpress compresses each layer's cache after its attention ran over the whole prompt, so the prefill's
    # token is the full cache's; the tokens after it are read from the 75 kept positions
    pressed = kvpress_peer.generate(folder, [ids], "streaming", KEEP, 8)[0]["token_ids"]
    assert pressed[0] == out[1]["token_ids"][0]
    assert len(pressed) == 8 or pressed[-1] in model.generation_config.eos_token_id
