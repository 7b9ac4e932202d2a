"""Test support shared by more than one suite (tests/e2e, tests/drills)."""
