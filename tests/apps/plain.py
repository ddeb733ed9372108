"""A FastAPI app without kiban: what `kiban check` must find wanting."""

from fastapi import FastAPI

app = FastAPI()


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}
