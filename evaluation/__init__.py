"""Model evaluation: multiple choice by log-likelihood, perplexity, and a canned-prompt smoke test."""
