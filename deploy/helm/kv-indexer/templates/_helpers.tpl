{{- define "kv-indexer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kv-indexer.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "kv-indexer.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "kv-indexer.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "kv-indexer.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "kv-indexer.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{- define "kv-indexer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kv-indexer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: indexer
{{- end }}

{{- define "kv-indexer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kv-indexer.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Pod Security "restricted": what every pod of this chart runs under. */}}
{{- define "kv-indexer.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "kv-indexer.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
The kv-publisher sidecar for an engine pod. Call with
(dict "root" $ "engine" .Values.workers.vllm "flavor" "vllm"): it connects to the engine's
ZMQ sockets inside the pod (live 5557, replay 5558) and publishes as <pod IP>:8000.
*/}}
{{- define "kv-indexer.publisherSidecar" -}}
- name: kv-publisher
  image: {{ include "kv-indexer.image" .root }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  command: ["kv-publisher", "bridge"]
  env:
    - name: POD_IP
      valueFrom:
        fieldRef:
          fieldPath: status.podIP
    - name: KV_PUBLISHER_FLAVOR
      value: {{ .flavor | quote }}
    - name: KV_PUBLISHER_ZMQ_ENDPOINT
      value: tcp://127.0.0.1:5557
    - name: KV_PUBLISHER_REPLAY_ENDPOINT
      value: tcp://127.0.0.1:5558
    - name: KV_PUBLISHER_TOPIC
      value: {{ .engine.topic | quote }}
    - name: KV_PUBLISHER_MODEL
      value: {{ .engine.model | quote }}
    - name: KV_PUBLISHER_WORKER_ID
      value: $(POD_IP):8000
    - name: KV_PUBLISHER_BLOCK_SIZE
      value: {{ .engine.blockSize | quote }}
    - name: KV_PUBLISHER_NATS_URL
      value: {{ .root.Values.workers.natsUrl | quote }}
    - name: KV_PUBLISHER_METRICS_LISTEN
      value: 0.0.0.0:9401
  ports:
    - name: bridge-metrics
      containerPort: 9401
      protocol: TCP
  # /healthz fails only after 5 minutes of NATS away or nothing acknowledged: a restart
  # starts a new epoch, and this is no readiness probe (it would take the engine out too).
  livenessProbe:
    httpGet:
      path: /healthz
      port: bridge-metrics
    periodSeconds: 20
    failureThreshold: 15
  resources:
    {{- toYaml .root.Values.workers.sidecar.resources | nindent 4 }}
  securityContext:
    {{- include "kv-indexer.containerSecurityContext" .root | nindent 4 }}
{{- end }}
