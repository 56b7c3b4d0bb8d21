"""Shared plumbing below producers, consumers and dashboard: settings, the transport log, the store."""
