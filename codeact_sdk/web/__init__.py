"""The web chat (`codeact web`): a page on 127.0.0.1 over the SDK, its conversations kept in SQLite."""
