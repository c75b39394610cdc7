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

    return LLM(str(tiny_qwen), max_model_len=256, max_num_seqs=16)


@pytest.fixture(scope="session")
def tiny_server(tiny_qwen):
    """`nimblelm serve` on the tiny model, in its own process on a free loopback port."""
    from server_process import ServerProcess

    server = ServerProcess(tiny_qwen, "--max-model-len", "128", "--max-num-seqs", "16")
    yield server
    server.stop()


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
