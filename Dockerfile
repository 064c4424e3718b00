# esm-workers with every broker's client. Build your image FROM this one, adding your handlers
# under /app (the working directory handlers are imported from):
#   docker build -t esm-workers .
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY workers ./workers
COPY connectors ./connectors
RUN pip install --no-cache-dir '.[kafka,rabbitmq,redis]'
WORKDIR /app
USER 1000
ENTRYPOINT ["workers"]
CMD ["--help"]
