import pytest

# The shared assert helpers there should report like assertions in a test.
pytest.register_assert_rewrite("tests.integration.helpers")
