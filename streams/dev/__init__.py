"""Development tools: the embedded broker and Redis, the simulator, the demo."""
