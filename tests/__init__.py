"""The test suite (a package, so `tests.helpers` is ours and not a same-named installed one)."""
