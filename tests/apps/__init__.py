"""Small apps the tests run in subprocesses (``python -m tests.apps.<name>``)."""
