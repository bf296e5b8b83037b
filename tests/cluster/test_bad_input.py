"""Bad input met on Ray: a resume against the tiny real run, and a capacity check on a
private cluster; each exit 2 with one `error:` line, nothing lost (tests/bad_input_cases.py)."""

from __future__ import annotations

import pytest
from bad_input_cases import check_case, params


@pytest.mark.parametrize("name", params(on_ray=True))
def test_bad_input(name, runner, world):
    check_case(name, runner, world)
