"""The Textual app: renders what the engine sends, turns keys into commands. Never imports torch."""
