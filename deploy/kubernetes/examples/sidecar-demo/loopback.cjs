// Preloaded into the MCP server (NODE_OPTIONS=--require=...): every TCP server the process starts
// listens on 127.0.0.1 only, whatever address it asked for. The reference "everything" server binds all
// addresses and has no setting for it; on loopback only the proxy in the same pod reaches it.
'use strict';
const net = require('node:net');

const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const first = args[0];
  if (typeof first === 'number' || (typeof first === 'string' && /^\d+$/.test(first))) {
    // listen(port[, host][, backlog][, callback])
    if (typeof args[1] === 'string') {
      args[1] = '127.0.0.1';
    } else {
      args.splice(1, 0, '127.0.0.1');
    }
  } else if (first !== null && typeof first === 'object' && first.path === undefined && first.fd === undefined &&
             first._handle === undefined) {
    // listen({ port, host, ... })
    args[0] = { ...first, host: '127.0.0.1' };
  }
  return listen.apply(this, args);
};
