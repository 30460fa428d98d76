"""A pytest plugin for `make test` (`-p tests.browser_notice`): when the browser tests of the chat
page were skipped (no Chromium or no Playwright), the run ends with a banner that says so, not one
`s` among hundreds of dots."""

from __future__ import annotations

BROWSER_FILES = ("test_ui.py",)


def skipped_browser_tests(reports) -> list[str]:
    """The reasons of the skipped reports that belong to the browser tests."""
    reasons = []
    for report in reports:
        if any(name in report.nodeid or name in str(report.location[0]) for name in BROWSER_FILES):
            reasons.append(str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr))
    return reasons


def pytest_terminal_summary(terminalreporter):
    reasons = skipped_browser_tests(terminalreporter.stats.get("skipped", []))
    if reasons:
        terminalreporter.write_sep("!", "BROWSER TESTS SKIPPED", red=True, bold=True)
        terminalreporter.write_line(f"{len(reasons)} chat-page tests did not run: {reasons[0]}", red=True, bold=True)
        terminalreporter.write_line("install Chromium (sudo apt-get install chromium) and run make test again",
                                    red=True, bold=True)
