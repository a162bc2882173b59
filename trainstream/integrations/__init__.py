"""Adapters that let code written for other logging APIs publish to trainstream."""
