"""The agent adapter: Claude Code run headless inside a sandbox, its stream-json parsed."""
