"""panopticon: jail the network of an AI agent behind a policy-enforcing proxy."""

__version__ = "0.1.0"
