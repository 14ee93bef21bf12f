"""Data: read rows, convert them to messages, render them with the chat template, save."""
