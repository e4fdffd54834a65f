# Image for the API, the workers and the migrate job (see docker-compose.yml).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY feedsvc ./feedsvc
COPY cql ./cql
RUN pip install --no-cache-dir -e .
ENV FEEDSVC_HOST=0.0.0.0
EXPOSE 8080
ENTRYPOINT []
