import pytest
from tiny_models import make_tiny_hf_model


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    # A larger init spread gives peaked distributions, so greedy choices are not near-ties.
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny") / "qwen2", arch="qwen2", initializer_range=0.3)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama", initializer_range=0.3)


@pytest.fixture(scope="session")
def tiny_llm(tiny_qwen):
    from nimblelm import LLM

    return LLM(str(tiny_qwen), dtype="float32", max_model_len=256, max_num_seqs=16)


@pytest.fixture(scope="session")
def tiny_server(tiny_qwen):
    """`nimblelm serve` on the tiny model, in its own process on a free loopback port."""
    from server_process import ServerProcess

    server = ServerProcess(tiny_qwen, "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "16",
                           "--prompt-compression-scorer", str(tiny_qwen))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster of 2 CPUs for the module's tests (each module its own: a `nimblelm serve` that starts
    Ray in another process must not find this one)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smollm2_hf():
    """The packaged SmolLM2-135M's float32 weights as a Hugging Face folder (for peers that load only those),
    and 400 tokens of counting text in its tokenizer."""
    from nimblelm.bench.backends import BenchContext
    from nimblelm.bench.vllm_peer import ensure_hf_folder

    ctx = BenchContext(model="smollm2-135m")
    text = " ".join(f"Crate {i} holds {i * 7 % 13} red and {i * 5 % 11} blue marbles." for i in range(100))
    ids = ctx.tokenizer.encode(text, add_special_tokens=False)[:400]
    assert len(ids) == 400
    return ensure_hf_folder(ctx), ids


@pytest.fixture(scope="session")
def kvpress_on_smollm2(smollm2_hf):
    """The kvpress presses that test_kvpress_peer.py and test_kv_policy.py compare with, on the packaged
    SmolLM2-135M, from one worker (one model load): by name, (positions kept per layer, 16 greedy tokens)."""
    from nimblelm.bench import kvpress_peer

    folder, ids = smollm2_hf
    presses = {
        "streaming-300": (ids[:300], "streaming", 0.25, {}),
        "snapkv-300": (ids[:300], "snapkv", 0.25, {"window_size": 64, "kernel_size": 5}),
        "snapkv": (ids[:320], "snapkv", 0.25, {}),
        "streaming": (ids[:320], "streaming", 0.25, {}),
        "pyramidkv": (ids[:320], "pyramidkv", 0.25, {"window_size": 16, "kernel_size": 5, "beta": 4}),
    }
    return dict(zip(presses, kvpress_peer.kept_each(folder, list(presses.values()), 16)))


@pytest.fixture
def replays(monkeypatch):
    """The row counts of the decode steps replayed from traces (engine/step_capture.py), as they happen."""
    from nimblelm.engine.step_capture import StepCapture

    rows = []
    replay = StepCapture.__call__

    def counted(self, input_ids, *args):
        rows.append(len(input_ids))
        return replay(self, input_ids, *args)

    monkeypatch.setattr(StepCapture, "__call__", counted)
    return rows


@pytest.fixture
def record_ops(monkeypatch):
    """record_ops(module): the list of the compiled ops that module's layers call from then on, by name."""

    def record(module) -> list[str]:
        called, ops_for = [], module.ops_for

        class Recorder:
            def __init__(self, ops):
                self.ops = ops

            def __getattr__(self, name):
                called.append(name)
                return getattr(self.ops, name)

        monkeypatch.setattr(module, "ops_for", lambda x: None if ops_for(x) is None else Recorder(ops_for(x)))
        return called

    return record


@pytest.fixture(params=["off", "dot", "amx"])
def bf16_products(request):
    """A bfloat16 test on each path of its linears of several rows: the panel kernel (float32 FMAs), AVX-512
    BF16 dot products and AMX tiles, the last two where this machine and build offer them. The fewest
    rows the products take, 0 for off."""
    from nimblelm.kernels import cpu_ops

    ops = cpu_ops()
    if ops is None:
        pytest.skip("the C++ kernels did not build here")
    before = ops.bf16_products()
    rows = ops.set_bf16_products(request.param)
    try:
        if request.param != "off" and not rows:
            pytest.skip(f"no {request.param} bfloat16 products here: the CPU, the kernel build or the OS lacks them")
        yield rows
    finally:
        ops.set_bf16_products(before)
