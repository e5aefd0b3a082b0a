// The access-token keys, parsed once per process; Ed25519 through node:crypto.
import { Injectable } from "@nestjs/common";
import { KeyObject, createPrivateKey, createPublicKey, sign, verify } from "node:crypto";
import * as core from "../../shared/core";

export const codec: core.Codec = {
  encode: (b) => Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString("base64url"),
  decode: (s) => Buffer.from(s, "base64url"),
};

@Injectable()
export class Keys {
  private readonly verifiers: Array<[string, KeyObject]> = [];
  private readonly signer: KeyObject;
  private readonly headerB64: string;

  constructor() {
    const entries = core.parseKeyEntries(process.env.JWT_SIGNING_KEYS ?? "");
    let signer: KeyObject | undefined;
    for (const e of entries) {
      const priv = createPrivateKey({
        key: Buffer.from(core.ed25519Pkcs8(codec.decode(e.seed))),
        format: "der",
        type: "pkcs8",
      });
      signer ??= priv;
      this.verifiers.push([e.kid, createPublicKey(priv)]);
    }
    this.signer = signer!;
    this.headerB64 = core.headerB64(entries[0].kid, codec);
  }

  verify(token: string, now: number): core.AccessClaims {
    const t = core.preverify(token, this.verifiers, codec);
    if (!verify(null, t.signed, t.key, t.signature)) throw core.badSignature();
    return core.checkClaims(t.claimsB64, now, codec);
  }

  /** `<header>.<claims>.<signature>` for already-serialised claims. */
  sign(claims: Uint8Array): string {
    const input = `${this.headerB64}.${codec.encode(claims)}`;
    return `${input}.${sign(null, Buffer.from(input), this.signer).toString("base64url")}`;
  }
}
