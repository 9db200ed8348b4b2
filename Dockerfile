FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY mailbot ./mailbot
COPY rules ./rules
COPY templates ./templates
COPY db ./db
RUN pip install --no-cache-dir . \
    && useradd --system --home /data mailbot \
    && mkdir -p /data && chown mailbot /data

USER mailbot
WORKDIR /data
ENV MAILBOT_DB=sqlite:////data/mailbot.db \
    MAILBOT_SMTP_LISTEN=0.0.0.0:2525 \
    MAILBOT_SENT_MAILDIR=/data/sent
EXPOSE 2525
CMD ["mailbot", "run"]
