import os

import pytest
import torch

# Never let a test reach for the Hugging Face hub (it would hang ~25 s before failing).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Without a GPU, Triton kernels can only run in its interpreter, and triton reads this
# variable once, when it is first imported: set it before any test can import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread: training tests on tiny models are dominated by thread
    wake-ups, and on a shared 2-core machine a second thread only adds waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def op_backend(request):
    """Indirect parameter (backends_under_test.single_isa_backend_params): the backend's name,
    with its ISA selected and C++ outputs poisoned for the test."""
    from backends_under_test import using

    with using(request.param) as name:
        yield name
