"""laas.router: decides where each request runs. Pure decisions live in policy.py."""
