"""funnelcake-deploy-bot: deploys funnelcake to production, staging and poc from Slack."""
