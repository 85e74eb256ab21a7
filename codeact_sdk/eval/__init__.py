"""`codeact eval`: code actions against JSON and text actions, on any OpenAI-compatible endpoint."""
