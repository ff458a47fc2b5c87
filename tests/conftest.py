"""Test configuration: CI (CI=true) runs hypothesis derandomized, so that a run is repeatable;
local runs keep exploring new examples."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
