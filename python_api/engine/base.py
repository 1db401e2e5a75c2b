"""Kept for code written against the old location: the vocabulary lives in python_api/messages.py."""
from python_api.messages import FederatedClient, FederatedMethod, Message, Transport

__all__ = ["Message", "Transport", "FederatedClient", "FederatedMethod"]
