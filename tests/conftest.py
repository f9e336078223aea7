import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=100,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
# "ci" is the default; `pytest --hypothesis-profile=dev` runs a quicker, randomised pass
settings.load_profile("ci")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# the third-party plug-in of tests/plugin_pkg joins the property matrix in-process (tests/test_api.py
# also installs it as a package and uses it through its entry point)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "plugin_pkg"))
from sparsekit_toy import Strided  # noqa: E402

import sparsekit  # noqa: E402

sparsekit.register_backend("strided", Strided)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
