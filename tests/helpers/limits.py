"""The one wall-clock limit tests may use: CI's own (a slow machine must never fail a test)."""

CI_LIMIT_S = 90 * 60
