"""Evaluation harness: tasks with official metrics, a durable resumable runner, reports."""
