"""ReMask for Composer."""
