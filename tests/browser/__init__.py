"""Tests that drive a real headless browser (Debian chromium through Playwright)."""
