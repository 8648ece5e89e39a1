"""Small constructed training problems: stuck ones and healthy controls."""
