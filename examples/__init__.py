"""Runnable examples: the signup demo app instrumented by SigTrace."""
